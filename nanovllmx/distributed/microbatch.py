"""Splitting one step's ScheduledBatch into pipeline micro-batches.

With pp_size stages, a step sent as one batch keeps one stage busy at a time. Split into m
micro-batches (contiguous groups of requests with about the same number of tokens), stage 0 runs
micro-batch k+1 while stage 1 runs micro-batch k, so a step costs about (m + pp - 1) / m stage
times instead of pp. Each micro-batch is a complete ScheduledBatch of its own; the sampled ids of
the micro-batches, concatenated in order, are the ids of the whole batch (sample rows keep their
order because the groups are contiguous).
"""

from __future__ import annotations

import numpy as np

from nanovllmx.scheduler.messages import ScheduledBatch, StepLogprobs, StepOutput, TokenLogprobs


def split_points(q_lens: np.ndarray, m: int) -> list[int]:
    """Row boundaries [0, ..., B] of up to m contiguous, non-empty groups of about equal tokens."""
    B = len(q_lens)
    m = max(1, min(m, B))
    cu = np.cumsum(q_lens)
    total = int(cu[-1])
    bounds = [0]
    for k in range(1, m):
        # first row index whose cumulative token count reaches k/m of the total
        r = int(np.searchsorted(cu, total * k / m, side="left")) + 1
        r = min(max(r, bounds[-1] + 1), B - (m - k))
        bounds.append(r)
    bounds.append(B)
    return bounds


def split_batch(b: ScheduledBatch, m: int) -> list[ScheduledBatch]:
    # prompt logprobs (rare: eval requests) keep their step whole rather than split their plan
    if m <= 1 or b.num_reqs < 2 or b.prompt_logprobs is not None:
        return [b]
    bounds = split_points(b.q_lens, m)
    cu = np.zeros(b.num_reqs + 1, dtype=np.int64)
    np.cumsum(b.q_lens, out=cu[1:])
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        t0, t1 = int(cu[lo]), int(cu[hi])
        rows = b.req_indices[lo:hi]
        tmask = np.isin(b.table_rows, rows) if len(b.table_rows) else np.zeros(0, dtype=bool)
        smask = (b.sample_rows >= lo) & (b.sample_rows < hi)
        ids = b.input_ids[t0:t1]
        grammar_rows = bitmask = None
        if b.grammar_rows is not None:  # PP grids run without overlap: masks travel with their batch
            assert b.bitmask is not None and not b.mask_deferred
            sidx = np.nonzero(smask)[0]  # this part's sampled rows, as indices into the whole batch's
            gmask = np.isin(b.grammar_rows, sidx)
            if gmask.any():
                grammar_rows = np.searchsorted(sidx, b.grammar_rows[gmask]).astype(b.grammar_rows.dtype)
                bitmask = b.bitmask[gmask]
        out.append(
            ScheduledBatch(
                step=b.step,
                req_indices=rows,
                start_pos=b.start_pos[lo:hi],
                q_lens=b.q_lens[lo:hi],
                input_ids=ids,
                out_slots=b.out_slots[t0:t1],
                table_rows=b.table_rows[tmask],
                table_cols=b.table_cols[tmask],
                table_slots=b.table_slots[tmask],
                sample_rows=(b.sample_rows[smask] - lo).astype(b.sample_rows.dtype),
                sampling=b.sampling.take(smask),
                has_placeholders=bool(b.has_placeholders and (ids < 0).any()),
                grammar_rows=grammar_rows,
                bitmask=bitmask,
                resolve_until=b.resolve_until,
            )
        )
    # the sampler's token-table writes go with the first micro-batch: they precede every sample
    out[0].hist_rows, out[0].hist_cols, out[0].hist_ids = b.hist_rows, b.hist_cols, b.hist_ids
    return out


def _pad_top(lp: TokenLogprobs, k: int) -> TokenLogprobs:
    n, have = lp.top_ids.shape
    if have == k:
        return lp
    ids = np.zeros((n, k), np.int32)
    vals = np.full((n, k), -np.inf, np.float32)
    ids[:, :have], vals[:, :have] = lp.top_ids, lp.top_logprobs
    return TokenLogprobs(lp.token_ids, lp.logprobs, lp.ranks, ids, vals)


def merge_outputs(outs: list[StepOutput]) -> StepOutput:
    """The StepOutput of a whole step from its micro-batches' (in order; a step with prompt
    logprobs is never split)."""
    if len(outs) == 1:
        return outs[0]
    tokens = np.concatenate([o.tokens for o in outs])
    parts = [(o, off) for o, off in zip(outs, np.cumsum([0] + [len(o.tokens) for o in outs[:-1]]).tolist())]
    sampled = [(o.logprobs, off) for o, off in parts if o.logprobs is not None and o.logprobs.sampled is not None]
    if not sampled:
        return StepOutput(tokens)
    assert all(lp is not None for lp, _ in sampled)
    k = max(lp.sampled.top_ids.shape[1] for lp, _ in sampled if lp is not None and lp.sampled is not None)
    pads = [_pad_top(lp.sampled, k) for lp, _ in sampled if lp is not None and lp.sampled is not None]
    rows = np.concatenate([lp.sampled_rows + off for lp, off in sampled if lp is not None]).astype(np.int32)
    merged = TokenLogprobs(*(np.concatenate([getattr(p, f) for p in pads]) for f in TokenLogprobs.__dataclass_fields__))
    return StepOutput(tokens, StepLogprobs(rows, merged, None))
