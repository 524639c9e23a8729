from __future__ import annotations

import torch
from torch import nn

from nanovllmx.attention.base import get_attention_backend


class Attention(nn.Module):
    """Stores this layer's new K/V in the pool and attends over each request's context, through
    whichever backend the worker put in the forward context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, layer_id: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.layer_id = scale, layer_id

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        o = get_attention_backend().forward(self.layer_id, q, k, v, self.scale)
        return o.reshape(q.shape[0], self.num_heads * self.head_dim)
