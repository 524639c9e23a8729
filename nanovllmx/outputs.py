"""What the engine hands back to callers: a finished request, or a streamed delta."""

from __future__ import annotations

from dataclasses import dataclass, field

from nanovllmx.scheduler.request import FinishReason, TokenLogprob

__all__ = ["RequestOutput", "StreamDelta", "TokenLogprob"]


@dataclass
class RequestOutput:
    """A finished request (offline `generate`)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None  # None while running
    num_cached_tokens: int = 0  # prompt tokens served from the radix cache
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids (SamplingParams.logprobs)
    # one per prompt token, None for the first (SamplingParams.prompt_logprobs)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # seconds from submission to the first token reaching this process (TTFT as a caller sees it,
    # without HTTP: the offline counterpart of the serving benchmarks' TTFT); None without tokens
    ttft: float | None = None


@dataclass
class StreamDelta:
    """One increment of a streamed request: the new tokens and the text they complete."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0  # total so far
    queue_time: float | None = None  # seconds from arrival to first scheduled; known from the first token on
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first delta, when asked
