"""Two GPUs only (skipped elsewhere): the one-shot TP all-reduce over peer memory
(distributed/one_shot_allreduce.py) sets up across two processes that see both GPUs and each use
their rank's (as the engine's workers do: placement.node_visible_gpus), and `tp_all_reduce` gives
NCCL's sums bit for bit: eagerly, replayed from a CUDA graph with new inputs, and for a message over
the one-shot limit (which goes to NCCL). With only its own GPU visible (Ray's default) the setup
fails ("allocations from overlapping devices") and the group stays on NCCL."""

from __future__ import annotations

import os
import tempfile
import time

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
    pytest.mark.timeout(150),
]


def _rank(rank: int, init_file: str, q) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = "0,1"
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    import torch.distributed as dist

    from nanovllmx.distributed import one_shot_allreduce
    from nanovllmx.distributed import parallel_state as ps

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    ps.init_parallel(2, 1, rank, "nccl", f"file://{init_file}")
    g = ps.get_parallel_info().tp_group
    dist.all_reduce(torch.ones(1, device=dev), group=g)
    out: dict = {"enabled": ps.init_one_shot_allreduce(dev, torch.bfloat16)}
    gen = torch.Generator(device=dev).manual_seed(rank)
    big = one_shot_allreduce.MAX_BYTES // 2 // 1024 + 8  # rows of 1024 bf16: over the limit
    for name, rows in (("decode", 128), ("one-row", 1), ("over-limit", big)):
        x = torch.randn((rows, 1024), generator=gen, device=dev).to(torch.bfloat16)
        ref = x.clone()
        dist.all_reduce(ref, group=g)
        out[name] = bool(torch.equal(ps.tp_all_reduce(x.clone()), ref))
    # captured in a CUDA graph, replayed on new data
    static = torch.zeros((64, 1024), device=dev, dtype=torch.bfloat16)
    ps.tp_all_reduce(static.clone())  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        res = ps.tp_all_reduce(static)
    ok = True
    for _ in range(3):
        static.copy_(torch.randn(static.shape, generator=gen, device=dev))
        ref = static.clone()
        dist.all_reduce(ref, group=g)
        graph.replay()
        torch.cuda.synchronize()
        ok &= bool(torch.equal(res, ref))
    out["graph"] = ok
    q.put((rank, out))
    ps.destroy_parallel()


def test_one_shot_allreduce_equals_nccl():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_rank, args=(r, os.path.join(d, "init"), q)) for r in range(2)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + 100  # a hung rank fails the test instead of holding the run
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        codes = [p.exitcode for p in procs]
        for p in procs:
            if p.is_alive():
                p.kill()
        assert codes == [0, 0], f"exit codes {codes} (None: still running after 100 s)"
    got = dict(q.get() for _ in range(2))
    for rank in (0, 1):
        assert got[rank] == {"enabled": True, "decode": True, "one-row": True, "over-limit": True, "graph": True}, got
