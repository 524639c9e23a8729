"""A one-shot all-reduce over NVLink peer memory for the tensor-parallel all-reduces of small
messages (decode steps), through PyTorch's symmetric memory (CUDA backend).

Each rank copies its partial sums into a buffer that every rank of the TP group has mapped, and each
rank then reads all the buffers and adds them in rank order (so every rank holds the same sum, as
with NCCL): one kernel and one barrier instead of NCCL's protocol, which dominates for messages of a
few hundred KB. NVLink multicast (the `multimem` ops, NVLS) is never used: it is off on our machines
(it can take the host's GPUs out of service), and TORCH_SYMM_MEM_DISABLE_MULTICAST is set here too.

Opt-in (`EngineConfig.tp_allreduce="one_shot"`). Setup is all or nothing across the TP group: the
ranks agree that the ops exist, that the rendezvous worked and that a test all-reduce equals NCCL's
bit for bit; otherwise every rank stays on NCCL. Messages over `max_bytes` (prefill) go to NCCL."""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# one-shot reads every peer's whole message; past a few MB NCCL's bandwidth-optimal ring wins
MAX_BYTES = 4 << 20


class OneShotAllReduce:
    def __init__(self, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype, max_bytes: int = MAX_BYTES):
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.dtype = dtype
        self.numel = max_bytes // dtype.itemsize
        self.buffer = symm_mem.empty(self.numel, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)
        self._copy_op = getattr(torch.ops.symm_mem, "one_shot_all_reduce_copy", None)

    def applies(self, x: torch.Tensor) -> bool:
        # whole 16-byte vectors: the kernel moves data in 16-byte loads (a [tokens, hidden] message always is)
        return (
            x.dtype == self.dtype and x.numel() <= self.numel and x.is_cuda and x.numel() * x.element_size() % 16 == 0
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the TP group of x (a new tensor; x is left as it is)."""
        n = x.numel()
        buf = self.buffer[:n]
        flat = x.contiguous().view(-1)
        if self._copy_op is not None:  # the copy into the buffer happens inside the kernel
            out = self._copy_op(buf, flat, "sum", self.group_name)
        else:
            buf.copy_(flat)
            out = torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", self.group_name)
        result: torch.Tensor = out.view(x.shape)
        return result


def _ops_available() -> bool:
    try:
        import torch.distributed._symmetric_memory  # noqa: F401

        return hasattr(torch.ops.symm_mem, "one_shot_all_reduce")
    except Exception:
        return False


def _all_agree(ok: bool, group: dist.ProcessGroup, device: torch.device) -> bool:
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def setup_one_shot(group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype) -> OneShotAllReduce | None:
    """A OneShotAllReduce on every rank of `group`, or None on every rank (then NCCL only). Called
    by every rank of the group at the same point (it runs collectives)."""
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")  # never NVLink multicast
    ok = device.type == "cuda" and _ops_available()
    if not _all_agree(ok, group, device):
        logger.warning("one-shot all-reduce unavailable (no symmetric memory ops or not CUDA): using NCCL")
        return None
    ar: OneShotAllReduce | None = None
    try:
        ar = OneShotAllReduce(group, device, dtype)
        # a decode-sized message, both ways: with two ranks the sums must be identical (a + b either
        # way); with more, NCCL may add in another order
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        g = torch.Generator(device=device).manual_seed(1234 + rank)
        x = torch.randn((64, 1024), generator=g, device=device).to(dtype)
        ref = x.clone()
        dist.all_reduce(ref, group=group)
        got = ar(x)
        torch.cuda.synchronize(device)
        same = torch.equal(got, ref) if world == 2 else torch.allclose(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
        ok = bool(same)
        if not ok:
            logger.warning("one-shot all-reduce differs from NCCL's on this rank: using NCCL")
    except Exception as e:
        logger.warning("one-shot all-reduce setup failed (%s: %s): using NCCL", type(e).__name__, e)
        ok = False
    if not _all_agree(ok, group, device):
        return None
    logger.info("TP all-reduce: one-shot over peer memory up to %d bytes, NCCL above", MAX_BYTES)
    return ar
