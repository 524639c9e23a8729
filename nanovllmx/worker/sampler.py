"""Batched sampling on the device: greedy, temperature, top-k, top-p, min-p and seeded requests,
with no per-request Python work except for the (rare) seeded rows."""
from __future__ import annotations

import torch

from nanovllmx.scheduler.messages import SamplingArrays


_GREEDY_EPS = 1e-5


class Sampler:
    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, logits: torch.Tensor, sa: SamplingArrays) -> torch.Tensor:
        logits = logits.float()
        if sa.all_greedy:
            return logits.argmax(dim=-1)
        dev = logits.device
        temp = torch.from_numpy(sa.temperature).to(dev, non_blocking=True)
        # below 1e-5 (as vLLM) a temperature is greedy: tiny ones overflow logits / temp to inf -> NaN
        greedy_rows = temp < _GREEDY_EPS
        logits = logits / torch.where(greedy_rows, 1.0, temp).unsqueeze(1)
        if sa.needs_filter:
            logits = self._filter(logits, sa)
        probs = torch.softmax(logits, dim=-1)
        # exponential race: argmax(p / q), q ~ Exp(1), draws from p without a cumsum-based search
        q = torch.empty_like(probs).exponential_()
        seeded = (sa.seeds >= 0).nonzero()[0]
        for i in seeded.tolist():  # seeded rows only: keyed by (seed, tokens so far) so batching never changes them
            g = torch.Generator(device=dev)
            g.manual_seed((int(sa.seeds[i]) * 1_000_003 + int(sa.output_lens[i])) % (2 ** 63))
            q[i] = torch.empty(probs.shape[1], device=dev).exponential_(generator=g)
        sampled = (probs / q).argmax(dim=-1)
        return torch.where(greedy_rows, logits.argmax(dim=-1), sampled)

    @staticmethod
    def _filter(logits: torch.Tensor, sa: SamplingArrays) -> torch.Tensor:
        dev = logits.device
        top_p = torch.from_numpy(sa.top_p).to(dev, non_blocking=True)
        top_k = torch.from_numpy(sa.top_k).to(dev, non_blocking=True)
        min_p = torch.from_numpy(sa.min_p).to(dev, non_blocking=True)
        probs = torch.softmax(logits, dim=-1)
        if (sa.min_p > 0).any():
            thresh = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
            logits = logits.masked_fill(probs < thresh, float("-inf"))
        if (sa.top_k > 0).any() or (sa.top_p < 1).any():
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            rank = torch.arange(logits.shape[1], device=dev).unsqueeze(0)
            k = torch.where(top_k > 0, top_k, logits.shape[1]).unsqueeze(1)
            drop = rank >= k
            sp = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
            # keep the smallest prefix whose mass reaches top_p (the top token always stays)
            # rows with top_p == 1 skip this: a float32 cumsum reaches 1.0 before the tail ends
            drop |= ((sp.cumsum(dim=-1) - sp) >= top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1)
            drop[:, 0] = False  # the most likely token always survives (top_p may round to 0 in float32)
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
        return logits
