"""The attention backend interface and the forward context the Attention layers read."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from nanovllmx.attention.metadata import AttentionMetadata, KVPool


class AttentionBackend:
    """Plans a batch once (`prepare`), then serves every layer's attention: `forward` stores the
    step's K/V and attends; `attend` alone serves callers that stored K/V themselves (the fused
    q/k norm + RoPE + store kernel on CUDA)."""

    def __init__(self, kv_pool: KVPool, num_heads: int, num_kv_heads: int, head_dim: int):
        self.kv = kv_pool
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.meta: AttentionMetadata | None = None

    def prepare(self, meta: AttentionMetadata) -> None:
        self.meta = meta

    def store_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        slots = self.meta.out_slots
        self.kv.k[layer][slots] = k
        self.kv.v[layer][slots] = v

    def attend(self, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of q [T, H, D] over each request's context in the pool, this step's K/V
        already stored at `meta.out_slots`. Returns [T, H, D]."""
        raise NotImplementedError

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        self.store_kv(layer, k, v)
        return self.attend(layer, q, scale)

    # ---- decode graphs (worker/cuda_graph.py). A backend that can be captured overrides these;
    # the defaults let a graph's step be replayed eagerly off the GPU (how CPU tests run it).
    def make_graph_wrapper(self, bs: int) -> object:
        return None

    def plan_graph(self, wrapper: object, meta: AttentionMetadata) -> None:
        self.prepare(meta)

    def gather_graph_indices(self, wrapper: object, meta: AttentionMetadata) -> None:
        pass


_BACKEND: AttentionBackend | None = None


def get_attention_backend() -> AttentionBackend:
    assert _BACKEND is not None, "attention called outside a forward context"
    return _BACKEND


@contextmanager
def forward_context(backend: AttentionBackend) -> Iterator[None]:
    global _BACKEND
    prev, _BACKEND = _BACKEND, backend
    try:
        yield
    finally:
        _BACKEND = prev
