from __future__ import annotations

import torch
from torch import nn

from nanovllmx.attention.base import get_attention_backend
from nanovllmx.layers.norm import RMSNorm
from nanovllmx.layers.rotary import RotaryEmbedding


def _fused_qkv(k_cache: torch.Tensor) -> bool:
    """Whether the fused Triton kernel serves a pool: on CUDA. A function so that the interpreter
    test (tests/unit/test_triton_interpreted.py) can turn it on for a CPU pool."""
    return k_cache.is_cuda


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

    def forward_qkv(
        self, qkv: torch.Tensor, positions: torch.Tensor, q_norm: RMSNorm, k_norm: RMSNorm, rotary: RotaryEmbedding
    ) -> torch.Tensor:
        """Attention from the fused qkv projection output [T, (H + 2*Hkv)*D]: per-head RMSNorm of
        q and k, RoPE, K/V store, attention. Returns [T, H*D]."""
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        be = get_attention_backend()
        kc, vc = be.kv.k[self.layer_id], be.kv.v[self.layer_id]
        if _fused_qkv(kc):
            # one kernel instead of three (q norm+RoPE, k norm+RoPE, K/V store): at these sizes
            # each costs its launch more than its work, 3 x num_layers times a step
            from nanovllmx.kernels.fused import qk_norm_rope_store

            assert q_norm.eps == k_norm.eps
            q = qk_norm_rope_store(
                qkv,
                H,
                Hkv,
                D,
                q_norm.weight,
                k_norm.weight,
                q_norm.eps,
                rotary.cos_sin,
                positions,
                kc,
                vc,
                be.meta.out_slots,
            )
            return be.attend(self.layer_id, q, self.scale).reshape(qkv.shape[0], H * D)
        # CPU: the PyTorch twins, numerically as HF computes them (the tests compare with transformers)
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        q, k = rotary(positions, q_norm(q.view(-1, H, D)), k_norm(k.view(-1, Hkv, D)))
        return self.forward(q, k, v.view(-1, Hkv, D))
