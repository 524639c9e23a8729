"""Per-forward attention state shared by every layer: which KV slots each request reads and writes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class AttentionMetadata:
    # host copies (the batch already lives on the host; backends plan from these without syncs)
    q_lens_np: np.ndarray  # [B] new tokens per request
    kv_lens_np: np.ndarray  # [B] context length after this step (cached + new)
    req_indices_np: np.ndarray  # [B] row of each request in req_to_token
    # device tensors
    req_indices: torch.Tensor  # [B] int32
    out_slots: torch.Tensor  # [T] KV slot each new token is written to
    req_to_token: torch.Tensor  # [max_reqs, context_len] slot of each request's token i
    is_decode: bool  # every request has exactly one new token

    @property
    def num_reqs(self) -> int:
        return len(self.q_lens_np)


class KVPool:
    """One K and one V tensor per local layer, indexed by token slot (page size 1). Row 0 is the
    padding slot that padded CUDA-graph entries write to."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (num_slots + 1, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots

    @staticmethod
    def bytes_per_slot(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
