"""Batched sampling on the device: greedy, temperature, top-k, top-p, min-p and seeded requests,
with no per-request Python work except for the (rare) seeded rows."""
from __future__ import annotations

import numpy as np
import torch

from nanovllmx.scheduler.messages import SamplingArrays


_GREEDY_EPS = 1e-5


class Sampler:
    def __init__(self, device: torch.device, fused: bool | None = None):
        self.device = device
        # one-pass Triton Gumbel-max for unfiltered batches on the GPU (nanovllmx/kernels/sampling.py)
        self.fused = device.type == "cuda" if fused is None else fused
        self._rng = np.random.default_rng()

    def __call__(self, logits: torch.Tensor, sa: SamplingArrays) -> torch.Tensor:
        if sa.all_greedy:
            return logits.argmax(dim=-1)
        if self.fused and not sa.needs_filter:
            return self._fused(logits, sa)
        logits = logits.float()
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

    def _fused(self, logits: torch.Tensor, sa: SamplingArrays) -> torch.Tensor:
        from nanovllmx.kernels.sampling import gumbel_sample
        t = sa.temperature
        inv_t = np.where(t < _GREEDY_EPS, 0.0, 1.0 / np.maximum(t, _GREEDY_EPS)).astype(np.float32)
        # Philox keys: a seeded row is keyed by (seed, tokens so far), as in the PyTorch path, so
        # batching never changes its draw; the others by a fresh random key per row and step
        keyed = (sa.seeds.astype(np.int64) * 1_000_003 + sa.output_lens) % (2 ** 31 - 1)
        fresh = self._rng.integers(0, 2 ** 31 - 1, size=len(t), dtype=np.int64)
        seeds = np.where(sa.seeds >= 0, keyed, fresh).astype(np.int32)
        dev = logits.device
        return gumbel_sample(logits, torch.from_numpy(inv_t).to(dev, non_blocking=True),
                             torch.from_numpy(seeds).to(dev, non_blocking=True)).long()

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
