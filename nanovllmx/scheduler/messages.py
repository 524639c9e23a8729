"""The narrow boundary between the scheduler and the workers: one plain, picklable message per
step in (`ScheduledBatch`), sampled token ids out. Arrays are numpy so building and shipping a
batch costs no per-request Python work on the worker side."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np


@dataclass
class LogitsArrays:
    """Per sampled row: the logits processing of nanovllmx/worker/logits_processing.py (penalties,
    logit_bias, min_tokens). Only sent when a row of the step uses one of them."""

    repetition: np.ndarray  # float32 [B], 1 = off
    presence: np.ndarray  # float32 [B], 0 = off
    frequency: np.ndarray  # float32 [B], 0 = off
    num_prompt: np.ndarray  # int32 [B] prompt tokens (presence/frequency count only the output's)
    seq_lens: np.ndarray  # int32 [B] tokens so far: the sampled token goes to this position
    banned: np.ndarray  # int32 [B, K1] EOS / stop ids masked (min_tokens not reached), -1 pads
    bias_ids: np.ndarray  # int32 [B, K2], -1 pads
    bias_values: np.ndarray  # float32 [B, K2]

    @property
    def needs_history(self) -> bool:
        return bool((self.repetition != 1).any() or (self.presence != 0).any() or (self.frequency != 0).any())

    def take(self, rows: np.ndarray) -> LogitsArrays:
        return LogitsArrays(
            *(getattr(self, f.name)[rows] for f in dataclasses.fields(self)),
        )


@dataclass
class SamplingArrays:
    temperature: np.ndarray  # float32 [B]
    top_p: np.ndarray  # float32 [B]
    top_k: np.ndarray  # int32 [B], 0 = off
    min_p: np.ndarray  # float32 [B]
    seeds: np.ndarray  # int64 [B], -1 = unseeded
    output_lens: np.ndarray  # int32 [B] tokens generated so far (seeded sampling is keyed by it)
    needs_filter: bool  # any top_p < 1, top_k > 0 or min_p > 0 in the batch
    all_greedy: bool
    logits: LogitsArrays | None = None  # penalties / logit_bias / min_tokens, when a row uses one
    logprobs: np.ndarray | None = None  # int32 [B] top logprobs wanted (-1: none), when a row asks

    @property
    def plain(self) -> bool:
        """Nothing but temperature and filters: the fast paths (CUDA graph sampling) apply."""
        return self.logits is None and self.logprobs is None

    def take(self, rows: np.ndarray) -> SamplingArrays:
        """The arrays of a subset of rows (a boolean mask or indices), flags recomputed."""
        t, tp, tk, mp = self.temperature[rows], self.top_p[rows], self.top_k[rows], self.min_p[rows]
        lp = self.logprobs[rows] if self.logprobs is not None else None
        return SamplingArrays(
            temperature=t,
            top_p=tp,
            top_k=tk,
            min_p=mp,
            seeds=self.seeds[rows],
            output_lens=self.output_lens[rows],
            needs_filter=bool((tp < 1).any() or (tk > 0).any() or (mp > 0).any()),
            all_greedy=bool((t == 0).all()),
            logits=self.logits.take(rows) if self.logits is not None else None,
            logprobs=lp if lp is not None and (lp >= 0).any() else None,
        )


@dataclass
class PromptLogprobsPlan:
    """Prompt positions of a step whose logprobs are wanted: for each listed batch row, `counts[i]`
    positions from its new token `offsets[i]`, each scored against the next prompt token."""

    rows: np.ndarray  # int32 [R] batch rows
    offsets: np.ndarray  # int32 [R]
    counts: np.ndarray  # int32 [R] positions of that row (from its first new token)
    top: np.ndarray  # int32 [R] top logprobs wanted
    targets: np.ndarray  # int32 [sum(counts)] the prompt token each position predicts


@dataclass
class TokenLogprobs:
    """Logprobs of N positions: the chosen (sampled or prompt) token's and the top K (best first;
    a row asking for fewer than K uses its first k)."""

    token_ids: np.ndarray  # int32 [N]
    logprobs: np.ndarray  # float32 [N]
    ranks: np.ndarray  # int32 [N] 1-based rank of the chosen token
    top_ids: np.ndarray  # int32 [N, K]
    top_logprobs: np.ndarray  # float32 [N, K]


@dataclass
class StepLogprobs:
    sampled_rows: np.ndarray  # int32 [L] indices into the step's sampled rows
    sampled: TokenLogprobs | None  # [L]
    prompt: TokenLogprobs | None  # the plan's positions, in order (PromptLogprobsPlan.counts)


@dataclass
class StepOutput:
    """What a step returns to the scheduler: the sampled ids, and logprobs when any were asked."""

    tokens: np.ndarray  # int32 [S]
    logprobs: StepLogprobs | None = None


@dataclass
class ScheduledBatch:
    step: int
    req_indices: np.ndarray  # int32 [B] row of each request in the worker's req_to_token table
    start_pos: np.ndarray  # int32 [B] tokens already in the KV cache
    q_lens: np.ndarray  # int32 [B] new tokens this step
    input_ids: np.ndarray  # int32 [T], T = q_lens.sum()
    out_slots: np.ndarray  # int32 [T] slot of each new token
    # extra req_to_token writes: prefix slots a request took from the radix cache
    table_rows: np.ndarray  # int32 [W]
    table_cols: np.ndarray  # int32 [W]
    table_slots: np.ndarray  # int32 [W]
    sample_rows: np.ndarray  # int32 [S] which requests of the batch sample a token this step
    sampling: SamplingArrays  # for the sampled rows only
    # input_ids holds -1 where the token is the one the previous (in-flight) step samples for
    # that request; the worker takes it from its device-side buffer of last sampled tokens
    has_placeholders: bool = False
    # constrained decoding (nanovllmx/structured/): which sampled rows (indices into sample_rows)
    # have a grammar, and their allowed next tokens as a packed int32 bitmask [G, ceil(vocab/32)];
    # None when no row has one. With overlap scheduling the mask of a row whose previous token is
    # still in flight is not known when the batch is built: `mask_deferred`, and it follows the
    # step (Executor.apply_grammar) once the scheduler has that token.
    grammar_rows: np.ndarray | None = None
    bitmask: np.ndarray | None = None
    mask_deferred: bool = False
    # token ids the sampler's history table (penalties) needs: written at admission, the rest
    # arrives as the worker samples (rows, cols, ids as the table_* writes)
    hist_rows: np.ndarray | None = None
    hist_cols: np.ndarray | None = None
    hist_ids: np.ndarray | None = None
    prompt_logprobs: PromptLogprobsPlan | None = None
    # pipeline overlap (pp > 1): before this batch, the first stage takes the sampled ids of every
    # step up to this one from the last stage (distributed/sample_channel.py); its placeholders
    # refer to those steps only
    resolve_until: int = 0

    @property
    def num_reqs(self) -> int:
        return len(self.q_lens)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def is_decode(self) -> bool:
        return len(self.input_ids) == len(self.q_lens)
