"""Batched sampling on the device: greedy, temperature, top-k, top-p, min-p and seeded requests,
with no per-request Python work except for the (rare) seeded rows."""

from __future__ import annotations

import numpy as np
import torch

from nanovllmx.scheduler.messages import SamplingArrays

_GREEDY_EPS = 1e-5


# rows with 0 < top_k <= this sample among their own top-k logits (torch.topk): no full-vocabulary
# sort, which costs milliseconds per step at 256 rows x 152k (Qwen3's defaults: top_k=20, top_p=0.95)
TOPK_MAX = 1024


def inverse_temperature(t: np.ndarray) -> np.ndarray:
    """float32 1/T per row, 0 for greedy rows (the fused kernel's argmax without noise)."""
    return np.where(t < _GREEDY_EPS, 0.0, 1.0 / np.maximum(t, _GREEDY_EPS)).astype(np.float32)


class Sampler:
    def __init__(self, device: torch.device, fused: bool | None = None):
        self.device = device
        # two-stage Triton Gumbel-max for unfiltered rows on the GPU (nanovllmx/kernels/sampling.py)
        self.fused = device.type == "cuda" if fused is None else fused

    def __call__(self, logits: torch.Tensor, sa: SamplingArrays) -> torch.Tensor:
        if sa.all_greedy:
            return logits.argmax(dim=-1)
        if not sa.needs_filter:
            return self._plain(logits, sa)
        # each row takes the path its own parameters choose, so its batch-mates never change a
        # seeded row's draw
        small = (sa.top_k > 0) & (sa.top_k <= TOPK_MAX)
        plain = ~small & (sa.top_k == 0) & (sa.top_p >= 1) & (sa.min_p <= 0)
        full = ~small & ~plain
        out = None
        for mask, path in ((plain, self._plain), (small, self._top_k), (full, self._full)):
            if mask.all():
                return path(logits, sa)
            if mask.any():
                rows = torch.from_numpy(np.nonzero(mask)[0]).to(logits.device, non_blocking=True)
                if out is None:
                    out = torch.empty(len(mask), dtype=torch.long, device=logits.device)
                out[rows] = path(logits[rows], sa.take(mask))
        return out

    def sample_constrained(self, logits: torch.Tensor, sa: SamplingArrays, bitmask: torch.Tensor) -> torch.Tensor:
        """Rows under a grammar: their packed int32 bitmask [G, ceil(V/32)] (on the device) applied
        to their logits, then the row's own sampling path."""
        from nanovllmx.structured.bitmask import apply_bitmask

        return self(apply_bitmask(logits.float(), bitmask), sa)

    def _plain(self, logits: torch.Tensor, sa: SamplingArrays) -> torch.Tensor:
        """Rows without filters: temperature (or greedy) over the whole vocabulary."""
        return self._fused(logits, sa) if self.fused else self._full(logits, sa)

    @staticmethod
    def _temperature(logits: torch.Tensor, sa: SamplingArrays) -> tuple[torch.Tensor, torch.Tensor]:
        temp = torch.from_numpy(sa.temperature).to(logits.device, non_blocking=True)
        # below 1e-5 (as vLLM) a temperature is greedy: tiny ones overflow logits / temp to inf -> NaN
        greedy_rows = temp < _GREEDY_EPS
        return logits / torch.where(greedy_rows, 1.0, temp).unsqueeze(1), greedy_rows

    @staticmethod
    def _noise(shape: tuple[int, int], sa: SamplingArrays, dev: torch.device, lengths: np.ndarray | None = None):
        """Exp(1) noise for the exponential race; a seeded row's is keyed by (seed, tokens so far) so
        batching never changes it (only its first `lengths[i]` entries are drawn from its key)."""
        q = torch.empty(shape, device=dev).exponential_()
        for i in (sa.seeds >= 0).nonzero()[0].tolist():
            n = shape[1] if lengths is None else int(lengths[i])
            g = torch.Generator(device=dev)
            g.manual_seed((int(sa.seeds[i]) * 1_000_003 + int(sa.output_lens[i])) % (2**63))
            q[i, :n] = torch.empty(n, device=dev).exponential_(generator=g)
        return q

    def _full(self, logits: torch.Tensor, sa: SamplingArrays) -> torch.Tensor:
        """PyTorch over the whole vocabulary: any filters (a full sort for top-p without top-k)."""
        logits, greedy_rows = self._temperature(logits.float(), sa)
        if sa.needs_filter:
            logits = self._filter(logits, sa)
        probs = torch.softmax(logits, dim=-1)
        # exponential race: argmax(p / q), q ~ Exp(1), draws from p without a cumsum-based search
        sampled = (probs / self._noise(probs.shape, sa, probs.device)).argmax(dim=-1)
        return torch.where(greedy_rows, logits.argmax(dim=-1), sampled)

    def _top_k(self, logits: torch.Tensor, sa: SamplingArrays) -> torch.Tensor:
        """Rows with 0 < top_k <= TOPK_MAX: min-p, top-k and top-p applied to the top-k logits only
        (the same rules as _filter: min-p against the most likely token, top-p over the top-k)."""
        k = int(sa.top_k.max())
        vals, idx = logits.topk(k, dim=-1)  # sorted, descending
        vals, greedy_rows = self._temperature(vals.float(), sa)
        dev = logits.device
        top_k = torch.from_numpy(sa.top_k).to(dev, non_blocking=True)
        drop = torch.arange(k, device=dev).unsqueeze(0) >= top_k.unsqueeze(1)
        if (sa.min_p > 0).any():  # p < min_p * p_max  <=>  logit - max logit < log(min_p)
            log_min_p = np.where(sa.min_p > 0, np.log(np.maximum(sa.min_p, 1e-30)), -np.inf).astype(np.float32)
            drop |= (vals - vals[:, :1]) < torch.from_numpy(log_min_p).to(dev, non_blocking=True).unsqueeze(1)
        if (sa.top_p < 1).any():
            top_p = torch.from_numpy(sa.top_p).to(dev, non_blocking=True)
            sp = torch.softmax(vals.masked_fill(drop, float("-inf")), dim=-1)
            drop |= ((sp.cumsum(dim=-1) - sp) >= top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1)
        drop[:, 0] = False  # the most likely token always survives
        probs = torch.softmax(vals.masked_fill(drop, float("-inf")), dim=-1)
        pick = (probs / self._noise(probs.shape, sa, dev, lengths=sa.top_k)).argmax(dim=-1)
        pick = torch.where(greedy_rows, 0, pick)
        return idx.gather(1, pick.unsqueeze(1)).squeeze(1)

    @staticmethod
    def _keys(n: int, dev: torch.device) -> torch.Tensor:
        # Philox keys of unseeded rows: from torch's device generator, which every worker seeds
        # alike, so TP ranks draw the same tokens (each resolves the next step's inputs from its own
        # samples). Capturable in a CUDA graph (the generator's offset advances at each replay).
        return torch.randint(0, 2**31 - 1, (n,), dtype=torch.int32, device=dev)

    def sample_unfiltered(self, logits: torch.Tensor, inv_temperature: torch.Tensor) -> torch.Tensor:
        """Unseeded rows without filters, all on the device (the decode CUDA graph captures this):
        inv_temperature float32 [B] (0: greedy). Returns int32 ids."""
        from nanovllmx.kernels.sampling import gumbel_sample

        return gumbel_sample(logits, inv_temperature, self._keys(logits.shape[0], logits.device))

    def _fused(self, logits: torch.Tensor, sa: SamplingArrays) -> torch.Tensor:
        from nanovllmx.kernels.sampling import gumbel_sample

        dev = logits.device
        keys = self._keys(len(sa.temperature), dev)
        seeded = sa.seeds >= 0
        if seeded.any():  # a seeded row's key is (seed, tokens so far), as in the PyTorch path
            keyed = ((sa.seeds.astype(np.int64) * 1_000_003 + sa.output_lens) % (2**31 - 1)).astype(np.int32)
            keys = torch.where(
                torch.from_numpy(seeded).to(dev, non_blocking=True),
                torch.from_numpy(keyed).to(dev, non_blocking=True),
                keys,
            )
        inv_t = torch.from_numpy(inverse_temperature(sa.temperature)).to(dev, non_blocking=True)
        return gumbel_sample(logits, inv_t, keys).long()

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
