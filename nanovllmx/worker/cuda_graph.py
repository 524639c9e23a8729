"""Decode steps replayed from CUDA graphs captured for a ladder of batch sizes. A batch is padded
up to the next captured size; padded rows read and write the dummy slot 0 through a dummy
req_to_token row, so they cost a little compute and touch nothing real."""
from __future__ import annotations

import numpy as np
import torch

from nanovllmx.attention.base import forward_context
from nanovllmx.attention.metadata import AttentionMetadata


def capture_sizes(max_bs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_bs] + list(range(16, max_bs + 1, 16))
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


class DecodeGraphs:
    def __init__(self, runner):
        from nanovllmx.attention.flashinfer_backend import FlashInferBackend
        self.r = runner
        be = runner.backend
        if not isinstance(be, FlashInferBackend):
            raise ValueError("CUDA graphs need the flashinfer attention backend (or enforce_eager=True)")
        cfg, dev = runner.cfg, runner.device
        self.max_bs = cfg.max_bs
        self.dummy_row = cfg.max_bs  # req_to_token row that stays all zeros -> slot 0
        self.sizes = capture_sizes(cfg.max_bs)
        n = cfg.max_bs
        self.ids = torch.zeros(n, dtype=torch.int32, device=dev)
        self.pos = torch.zeros(n, dtype=torch.int32, device=dev)
        self.slots = torch.zeros(n, dtype=torch.int32, device=dev)
        self.req_idx = torch.full((n,), self.dummy_row, dtype=torch.int32, device=dev)
        self.kv_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.graph_indices = torch.zeros(be.max_kv, dtype=torch.int32, device=dev)
        self.wrappers, self.graphs, self.logits = {}, {}, {}
        pool = None
        model = runner.model
        torch.cuda.synchronize(dev)
        for bs in reversed(self.sizes):
            w = be.make_graph_wrapper(bs, self.graph_indices)
            meta = self._meta(bs, np.full(bs, self.dummy_row, np.int32), np.ones(bs, np.int32))
            be.plan_graph(w, meta)
            with forward_context(be):
                model.compute_logits(model(self.ids[:bs], self.pos[:bs]))  # warm up outside the graph
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    self.logits[bs] = model.compute_logits(model(self.ids[:bs], self.pos[:bs]))
            pool = g.pool() if pool is None else pool
            self.wrappers[bs], self.graphs[bs] = w, g
            torch.cuda.synchronize(dev)

    def _meta(self, bs: int, req_idx_np: np.ndarray, kv_lens_np: np.ndarray) -> AttentionMetadata:
        return AttentionMetadata(
            q_lens_np=np.ones(bs, np.int32), kv_lens_np=kv_lens_np, req_indices_np=req_idx_np,
            req_indices=self.req_idx[:bs], kv_lens=self.kv_lens[:bs], cu_q_lens=None, out_slots=self.slots[:bs],
            req_to_token=self.r.req_to_token, is_decode=True)

    def can_run(self, bs: int) -> bool:
        return bs <= self.max_bs

    def run(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        bs = meta.num_reqs
        gbs = next(s for s in self.sizes if s >= bs)
        self.ids[:bs].copy_(ids)
        self.pos[:bs].copy_(positions)
        self.slots[:bs].copy_(meta.out_slots)
        self.req_idx[:bs].copy_(meta.req_indices)
        if gbs > bs:  # padded rows: dummy request, slot 0
            self.ids[bs:gbs].zero_()
            self.pos[bs:gbs].zero_()
            self.slots[bs:gbs].zero_()
            self.req_idx[bs:gbs].fill_(self.dummy_row)
        req_np = np.full(gbs, self.dummy_row, np.int32)
        req_np[:bs] = meta.req_indices_np
        kv_np = np.ones(gbs, np.int32)
        kv_np[:bs] = meta.kv_lens_np
        self.r.backend.plan_graph(self.wrappers[gbs], self._meta(gbs, req_np, kv_np))
        self.graphs[gbs].replay()
        return self.logits[gbs][:bs]
