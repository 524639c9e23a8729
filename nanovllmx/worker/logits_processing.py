"""Logits processing between the model and the sampler, batched on the device: min_tokens (EOS and
stop ids masked), logit_bias, and vLLM's penalties (repetition over prompt + output tokens,
presence / frequency over output tokens); and the logprobs of chosen tokens.

A step whose rows use none of these does nothing here (`SamplingArrays.logits is None`). Each
step builds its tensors once from the scheduler's padded arrays; no per-request Python work.

Penalties need each request's token ids so far, which the scheduler does not know for a step it
schedules ahead of the previous one's result (overlap scheduling). So the worker keeps a token
table like its req_to_token table: the scheduler writes a request's known ids when it is admitted
(ScheduledBatch.hist_*), and the worker writes every token it samples at its position."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from nanovllmx.scheduler.messages import LogitsArrays, TokenLogprobs


class TokenHistory:
    """Device table [rows, context_len] of token ids, allocated on first use (penalties only)."""

    def __init__(self, num_rows: int, context_len: int, device: torch.device):
        self.shape, self.device = (num_rows, context_len), device
        self.table: torch.Tensor | None = None

    def _get(self) -> torch.Tensor:
        if self.table is None:
            self.table = torch.zeros(self.shape, dtype=torch.int32, device=self.device)
        return self.table

    def _dev(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(self.device, non_blocking=True)

    def write(self, rows: np.ndarray, cols: np.ndarray, ids: np.ndarray) -> None:
        self._get()[self._dev(rows).long(), self._dev(cols).long()] = self._dev(ids)

    def record(self, rows: torch.Tensor, positions: np.ndarray, tokens: torch.Tensor) -> None:
        """Sampled tokens (on the device) at their positions; positions past the table are dropped
        (a request's last token, never read back)."""
        keep = positions < self.shape[1]
        if not keep.all():
            k = self._dev(keep)
            rows, tokens, positions = rows[k], tokens[k], positions[keep]
        self._get()[rows.long(), self._dev(positions).long()] = tokens

    def counts(self, rows: torch.Tensor, la: LogitsArrays, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(output token counts [B, vocab] float32, seen in prompt or output [B, vocab] bool)."""
        n = int(la.seq_lens.max())
        hist = self._get()[rows.long(), :n].long()  # [B, n]
        pos = torch.arange(n, device=hist.device).unsqueeze(0)
        seq = self._dev(la.seq_lens).unsqueeze(1)
        valid = pos < seq
        out_mask = valid & (pos >= self._dev(la.num_prompt).unsqueeze(1))
        # invalid positions count into a spare column past the vocabulary, dropped after
        dummy = torch.full_like(hist, vocab)
        counts = torch.zeros((len(la.seq_lens), vocab + 1), dtype=torch.float32, device=hist.device)
        counts.scatter_add_(1, torch.where(out_mask, hist, dummy), torch.ones_like(hist, dtype=torch.float32))
        seen = torch.zeros((len(la.seq_lens), vocab + 1), dtype=torch.bool, device=hist.device)
        seen.scatter_(1, torch.where(valid, hist, dummy), True)
        return counts[:, :vocab], seen[:, :vocab]


def apply_logits_processing(
    logits: torch.Tensor, la: LogitsArrays, history: TokenHistory, table_rows: torch.Tensor
) -> torch.Tensor:
    """float32 logits [B, V] with min_tokens, logit_bias and penalties applied (vLLM's order).
    `table_rows`: each row's req_to_token row (its history)."""
    logits = logits.float().clone()
    dev, V = logits.device, logits.shape[1]

    def dev_t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(dev, non_blocking=True)

    spare = torch.zeros((logits.shape[0], 1), dtype=logits.dtype, device=dev)
    if la.banned.shape[1]:  # min_tokens not reached: EOS and stop ids can't be drawn
        ids = dev_t(la.banned).long()
        wide = torch.cat([logits, spare], dim=1)
        wide.scatter_(1, torch.where(ids < 0, V, ids), float("-inf"))
        logits = wide[:, :V]
    if la.bias_ids.shape[1]:
        ids = dev_t(la.bias_ids).long()
        wide = torch.cat([logits, spare], dim=1)
        wide.scatter_add_(1, torch.where(ids < 0, V, ids), dev_t(la.bias_values))
        logits = wide[:, :V]
    if la.needs_history:
        counts, seen = history.counts(table_rows, la, V)
        rep = dev_t(la.repetition).unsqueeze(1)
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
        logits = logits - dev_t(la.frequency).unsqueeze(1) * counts
        logits = logits - dev_t(la.presence).unsqueeze(1) * (counts > 0).to(logits.dtype)
    return logits


class DeviceLogprobs(NamedTuple):
    """TokenLogprobs as tensors: on the device, then copied to the host without blocking."""

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    ranks: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor

    def to_host(self) -> DeviceLogprobs:
        # CUDA -> CPU with non_blocking lands in pinned memory: valid once the step's event is done
        return DeviceLogprobs(*(t.to("cpu", non_blocking=True) for t in self))

    def numpy(self) -> TokenLogprobs:
        return TokenLogprobs(*(t.numpy() for t in self))


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int, chunk: int = 1024) -> DeviceLogprobs:
    """Logprobs (float32 log-softmax of the raw logits) of `chosen` [N] at each of N rows, its
    1-based rank, and the top k of each row; in chunks of rows so a long prompt needs no [N, V]
    float32 copy at once."""
    n, dev = logits.shape[0], logits.device
    lp_parts, rank_parts, ti_parts, tv_parts = [], [], [], []
    for lo in range(0, n, chunk):
        lp = torch.log_softmax(logits[lo : lo + chunk].float(), dim=-1)
        got = lp.gather(1, chosen[lo : lo + chunk].long().unsqueeze(1))
        lp_parts.append(got.squeeze(1))
        rank_parts.append((lp > got).sum(dim=1).to(torch.int32) + 1)
        if k:
            v, i = lp.topk(k, dim=-1)
            tv_parts.append(v)
            ti_parts.append(i.to(torch.int32))
    return DeviceLogprobs(
        chosen.to(torch.int32),
        torch.cat(lp_parts) if n else torch.zeros(0, device=dev),
        torch.cat(rank_parts) if n else torch.zeros(0, dtype=torch.int32, device=dev),
        torch.cat(ti_parts) if k and n else torch.zeros((n, k), dtype=torch.int32, device=dev),
        torch.cat(tv_parts) if k and n else torch.zeros((n, k), device=dev),
    )


def cat_logprobs(parts: list[DeviceLogprobs]) -> DeviceLogprobs:
    return DeviceLogprobs(*(torch.cat(ts) for ts in zip(*parts)))


def prompt_positions(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Flat token indices of `counts[i]` positions from `starts[i]`, for every i."""
    total = int(counts.sum())
    offs = np.repeat(starts - np.cumsum(counts) + counts, counts)
    return (offs + np.arange(total)).astype(np.int64)
