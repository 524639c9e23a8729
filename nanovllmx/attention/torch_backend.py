"""Reference attention in plain PyTorch (CPU or GPU): one SDPA call per request. Slow, simple, and
the yardstick the fast backends are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanovllmx.attention.base import AttentionBackend


class TorchBackend(AttentionBackend):
    def attend(self, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        m = self.meta
        kc, vc = self.kv.k[layer], self.kv.v[layer]
        out = torch.empty_like(q)
        start = 0
        for r, qn, kvn in zip(m.req_indices_np.tolist(), m.q_lens_np.tolist(), m.kv_lens_np.tolist()):
            slots = m.req_to_token[r, :kvn].long()
            qi = q[start : start + qn].transpose(0, 1)  # [H, qn, D]
            ki, vi = kc[slots].transpose(0, 1), vc[slots].transpose(0, 1)  # [Hkv, kvn, D]
            # query t sits at position kvn - qn + t and sees keys 0..that position
            mask = (
                torch.arange(kvn, device=q.device)[None, :] <= (kvn - qn + torch.arange(qn, device=q.device))[:, None]
            )
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=True)
            out[start : start + qn] = o.transpose(0, 1)
            start += qn
        return out
