"""FlashInfer attention over the token-slot pool (paged KV with page size 1).

One plan per forward serves every layer: the prefill wrapper for batches with any multi-token
request (prefill chunks mixed with decodes), the decode wrapper (tensor cores) for pure decode.
The per-request page lists are gathered from the req_to_token table on the GPU by a Triton
kernel; only the small indptr arrays come from the host, where the batch already is."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import triton
import triton.language as tl

from nanovllmx.attention.base import AttentionBackend
from nanovllmx.attention.metadata import AttentionMetadata, KVPool
from nanovllmx.kernels.fused import store_kv

_WORKSPACE_BYTES = 256 << 20
_TC_MIN_BATCH = 80  # GQA groups of 2: tensor cores, without split-KV, from this decode batch size
_NOSPLIT_MIN_BATCH_GQA4 = 32  # groups of 4 and more (tensor cores always): no split-KV from this size


def decode_kernel(batch_size: int, group: int) -> tuple[bool, bool]:
    """(tensor cores, split-KV) for a decode batch of `batch_size` requests whose query heads
    come `group` to a KV head. Measured at the standard workload's contexts (page size 1, graph
    mode, `attn_bench.py --sweep [--heads 32]`, H200):
    - groups of 2 (Qwen3-0.6B, 1.7B): CUDA cores with split-KV up to 79 requests (3.28 vs 3.17 TB/s
      at 48, a tie at 64), tensor cores without split-KV from 80 (3.57 vs 3.29 at 80, 4.05 at 256;
      on an H100 the CUDA-core kernel led up to 64 and tensor cores from 128);
    - groups of 4 (Qwen3-4B, 8B; 14B and 32B have 5 and 8): the CUDA-core kernel reads at 2.0-2.4
      TB/s from 16 requests to 128, tensor cores at 3.0-3.7, without split-KV from 32 (3.15 vs 3.04
      at 32, 3.49 vs 3.35 at 64). The 8B's standard workload: +2.4% (13th session).
    Larger groups fill the tensor-core tiles better still, so they take the rule of 4."""
    if group >= 4:
        return True, batch_size < _NOSPLIT_MIN_BATCH_GQA4
    tc = batch_size >= _TC_MIN_BATCH
    return tc, not tc


@triton.jit
def _gather_kv_indices(req_to_token, req_indices, kv_indptr, out, stride, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.load(req_indices + pid).to(tl.int64)
    start = tl.load(kv_indptr + pid)
    n = tl.load(kv_indptr + pid + 1) - start
    for off in range(0, n, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < n
        tl.store(out + start + idx, tl.load(req_to_token + row * stride + idx, mask=m), mask=m)


class FlashInferBackend(AttentionBackend):
    def __init__(
        self,
        kv: KVPool,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        max_bs: int,
        context_len: int,
        decode_tensor_cores: bool | None = None,
    ):
        super().__init__(kv, num_heads, num_kv_heads, head_dim)
        # decode kernel by batch size (None) or forced (True: tensor cores, False: CUDA cores)
        self.decode_tensor_cores = decode_tensor_cores
        import flashinfer

        self.fi = flashinfer
        dev = kv.k[0].device
        self.dtype = kv.k[0].dtype
        self.workspace = torch.zeros(_WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.decodes = {
            tc: flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD", use_tensor_cores=tc)
            for tc in (False, True)
        }
        # a context may repeat shared prefix slots, so size by requests x context, not by pool size
        self.max_kv = (max_bs + 1) * context_len
        self.kv_indices = torch.empty(self.max_kv, dtype=torch.int32, device=dev)
        self.ones = torch.ones(max_bs + 1, dtype=torch.int32)
        self.caches = [(k.unsqueeze(1), v.unsqueeze(1)) for k, v in zip(kv.k, kv.v)]  # [S, page=1, Hkv, D]
        self.active = self.prefill
        self.device = dev
        # plan() stages its metadata in pinned host buffers and copies them asynchronously; with
        # overlap scheduling the next plan must not overwrite them before the GPU has read them
        self._planned = torch.cuda.Event()
        self._graph_indptr: dict[object, torch.Tensor] = {}  # graph wrapper -> its indptr buffer
        self._graph_indices: torch.Tensor | None = None  # the slot lists, shared by every graph wrapper
        self._build_modules()

    def _build_modules(self) -> None:
        """Load FlashInfer's JIT modules for the three kernels the engine runs (prefill, tensor-core and
        CUDA-core decode) at once, by planning each wrapper for a one-token batch on its own thread.
        On a machine without FlashInfer's compile cache each is a ninja build that the first plan()
        would run, one after the other: 92 s of a 113 s engine start on a fresh H200 (12th session).
        The builds are subprocesses, so the threads overlap them. Cached modules load in milliseconds."""
        one = torch.tensor([0, 1], dtype=torch.int32)

        def plan(wrapper) -> None:
            torch.cuda.set_device(self.device)  # a new thread starts on device 0
            if wrapper is self.prefill:
                self._plan_prefill(one, one, self.kv_indices[:1])
            else:
                self._plan_decode(wrapper, one, self.kv_indices[:1])

        with ThreadPoolExecutor(3) as pool:
            for f in [pool.submit(plan, w) for w in (self.prefill, *self.decodes.values())]:
                f.result()
        torch.cuda.synchronize(self.device)

    def use_tensor_cores(self, batch_size: int) -> bool:
        """Which decode kernel a batch of this size runs: `decode_kernel`'s choice for this model's
        GQA group, unless the engine forces one (`decode_tensor_cores`)."""
        if self.decode_tensor_cores is not None:
            return self.decode_tensor_cores
        return decode_kernel(batch_size, self.num_heads // self.num_kv_heads)[0]

    def _split_kw(self, batch_size: int) -> dict:
        """Split-KV off where `decode_kernel` says so: large decode batches fill the GPU without it,
        and the merge kernel goes; small ones need the splits for occupancy. A captured wrapper's
        size is fixed, so every plan of it agrees with its capture."""
        split = decode_kernel(batch_size, self.num_heads // self.num_kv_heads)[1]
        return {} if split else {"disable_split_kv": True}

    def _gather(
        self, req_to_token: torch.Tensor, req_indices: torch.Tensor, indptr: torch.Tensor, out: torch.Tensor
    ) -> None:
        """out[indptr[i]:indptr[i+1]] = req_to_token[req_indices[i], :len] for each request i."""
        _gather_kv_indices[(len(req_indices),)](
            req_to_token, req_indices, indptr, out, req_to_token.stride(0), BLOCK=512
        )

    def _indices(self, meta: AttentionMetadata) -> torch.Tensor:
        """The batch's slot lists into self.kv_indices; returns the host indptr."""
        indptr_host = self._indptr(meta.kv_lens_np)
        self._gather(
            meta.req_to_token, meta.req_indices, indptr_host.to(self.device, non_blocking=True), self.kv_indices
        )
        return indptr_host

    @staticmethod
    def _indptr(kv_lens_np: np.ndarray) -> torch.Tensor:
        indptr = np.zeros(len(kv_lens_np) + 1, dtype=np.int32)
        np.cumsum(kv_lens_np, out=indptr[1:])
        return torch.from_numpy(indptr)

    def prepare(self, meta: AttentionMetadata) -> None:
        self._planned.synchronize()
        self.meta = meta
        B = meta.num_reqs
        indptr = self._indices(meta)
        total = int(indptr[-1])
        if meta.is_decode:
            decode = self.decodes[self.use_tensor_cores(B)]
            self._plan_decode(decode, indptr, self.kv_indices[:total])
            self.active = decode
        else:
            qo = np.zeros(B + 1, dtype=np.int32)
            np.cumsum(meta.q_lens_np, out=qo[1:])
            self._plan_prefill(torch.from_numpy(qo), indptr, self.kv_indices[:total])
            self.active = self.prefill
        self._planned.record()

    def _plan_decode(self, wrapper, indptr: torch.Tensor, indices: torch.Tensor) -> None:
        """Plan a decode wrapper for len(indptr) - 1 requests of page-1 slot lists."""
        B = len(indptr) - 1
        wrapper.plan(
            indptr,
            indices,
            self.ones[:B],
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            1,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
            **self._split_kw(B),
        )

    def _plan_prefill(self, qo_indptr: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor) -> None:
        """Plan the prefill wrapper (causal) for len(indptr) - 1 requests of page-1 slot lists."""
        self.prefill.plan(
            qo_indptr,
            indptr,
            indices,
            self.ones[: len(indptr) - 1],
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            1,
            causal=True,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
        )

    # ---- CUDA graphs: one decode wrapper per captured batch size, sharing one indices buffer ----
    # The graph itself gathers its requests' KV slot lists (gather_graph_indices, captured), so a
    # step's host work is only the plan: the indptr and FlashInfer's split of the work.
    def make_graph_wrapper(self, bs: int):
        if self._graph_indices is None:  # one graph runs at a time: every size shares the slot lists
            self._graph_indices = torch.zeros(self.max_kv, dtype=torch.int32, device=self.device)
        indptr = torch.zeros(bs + 1, dtype=torch.int32, device=self.device)
        w = self.fi.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace,
            "NHD",
            use_cuda_graph=True,
            use_tensor_cores=self.use_tensor_cores(bs),
            paged_kv_indptr_buffer=indptr,
            paged_kv_indices_buffer=self._graph_indices,
            paged_kv_last_page_len_buffer=torch.ones(bs, dtype=torch.int32, device=self.device),
        )
        self._graph_indptr[w] = indptr
        return w

    def gather_graph_indices(self, wrapper, meta: AttentionMetadata) -> None:
        """Device side of a graph step (captured): the slot list of each request into the shared
        indices buffer, at the offsets the last plan_graph wrote into the wrapper's indptr."""
        self._gather(meta.req_to_token, meta.req_indices, self._graph_indptr[wrapper], self._graph_indices)

    def plan_graph(self, wrapper, meta: AttentionMetadata) -> None:
        """Host side of a graph step: plan a captured wrapper for (padded) decode metadata and make
        it the active one. The slot lists are gathered inside the graph (gather_graph_indices)."""
        self._planned.synchronize()
        self.meta = meta
        indptr = self._indptr(meta.kv_lens_np)
        # the indices argument is the wrapper's own buffer, so plan's copy into it is a no-op
        self._plan_decode(wrapper, indptr, self._graph_indices[: int(indptr[-1])])
        self._planned.record()
        self.active = wrapper

    def store_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        store_kv(k, v, self.kv.k[layer], self.kv.v[layer], self.meta.out_slots)

    def attend(self, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        return self.active.run(q, self.caches[layer])
