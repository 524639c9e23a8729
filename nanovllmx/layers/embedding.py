"""Vocab-parallel embedding and LM head: each TP rank holds a contiguous slice of the vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanovllmx.distributed.parallel_state import get_parallel_info, tp_all_gather_last_dim, tp_all_reduce
from nanovllmx.layers.linear import _divide


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        info = get_parallel_info()
        self.tp_rank, self.tp_size = info.tp_rank, info.tp_size
        self.vocab_per_rank = _divide(vocab_size, self.tp_size)
        self.start = self.tp_rank * self.vocab_per_rank
        self.weight = nn.Parameter(torch.empty(self.vocab_per_rank, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        param.data.copy_(loaded.narrow(0, self.start, self.vocab_per_rank))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local >= 0) & (local < self.vocab_per_rank)
        y = F.embedding(local.clamp(0, self.vocab_per_rank - 1), self.weight) * mask.unsqueeze(-1).to(self.weight.dtype)
        return tp_all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return tp_all_gather_last_dim(F.linear(hidden, self.weight))
