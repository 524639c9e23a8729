"""Applying packed int32 token bitmasks (xgrammar's layout) to logits on the device, in torch only:
the workers need no grammar library."""

from __future__ import annotations

import torch

_SHIFTS: dict[torch.device, torch.Tensor] = {}


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [G, vocab_size]: bit j of word i of a row allows token 32*i+j."""
    dev = bitmask.device
    shifts = _SHIFTS.get(dev)
    if shifts is None:
        shifts = _SHIFTS[dev] = torch.arange(32, dtype=torch.int32, device=dev)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # arithmetic shift: bit 31 of a negative word too
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [G, V] with the tokens each row's mask forbids set to -inf (a new tensor)."""
    return logits.masked_fill(~unpack_bitmask(bitmask, logits.shape[1]), float("-inf"))
