"""A request as the scheduler sees it: token ids and KV bookkeeping, no text."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from nanovllmx.sampling_params import SamplingParams

if TYPE_CHECKING:
    from nanovllmx.scheduler.radix_cache import TreeNode
    from nanovllmx.structured.grammar import GrammarState

# why a request ended: "stop" (EOS, a stop token or a stop string), "length" (max_tokens or the
# context), "abort" (the client), "error" (the engine failed or refused it)
FinishReason = Literal["stop", "length", "abort", "error"]


def check_prompt(token_ids: list[int], context_len: int, vocab_size: int | None = None) -> None:
    """Raise ValueError for a prompt no engine step can take. The one prompt check: the client API
    runs it before submitting (a caller gets the error at once), the scheduler again on arrival."""
    n = len(token_ids)
    if n == 0:
        raise ValueError("prompt is empty")
    if n >= context_len:
        raise ValueError(
            f"prompt has {n} tokens, but this model's context is {context_len} tokens "
            f"(prompt plus at least one generated token)"
        )
    if vocab_size is not None and (min(token_ids) < 0 or max(token_ids) >= vocab_size):  # C speed: per request
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class EngineRequest:
    """What a client submits to the engine core (picklable, crosses process boundaries)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.time)


@dataclass(frozen=True)
class AbortRequest:
    """Stop a request and free its KV slots (picklable, crosses process boundaries)."""

    request_id: str


# what a client sends the engine core, in order
EngineMessage = EngineRequest | AbortRequest


@dataclass
class TokenLogprob:
    """A token's logprob under the model (log-softmax of its raw logits, before temperature,
    penalties or biases), its 1-based rank, and the `k` most likely tokens there, best first."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob)


@dataclass
class EngineOutput:
    """What the engine core reports per step for one request (picklable)."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    queue_time: float | None = None  # on a request's first token: seconds from arrival to first scheduled
    logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asked
    # with the first token, when the request asked: prompt tokens 1.. (nothing predicts the first)
    prompt_logprobs: list[TokenLogprob] | None = None

    @classmethod
    def failed(
        cls, request_id: str, error: str, num_prompt_tokens: int = 0, num_cached_tokens: int = 0
    ) -> EngineOutput:
        """The request ended with an error (refused on arrival, or failed while running)."""
        return cls(request_id, [], "error", num_prompt_tokens, num_cached_tokens, error)


class Request:
    __slots__ = (
        "request_id",
        "tokens",
        "num_prompt",
        "params",
        "arrival_time",
        "status",
        "num_computed",
        "num_cached",
        "prefix_len",
        "last_node",
        "req_idx",
        "finish_reason",
        "num_preemptions",
        "stop_ids",
        "first_scheduled_time",
        "pending",
        "grammar",
        "plp_done",
        "prompt_lps",
        "special",
        "last_sample_step",
    )

    def __init__(self, er: EngineRequest, eos_ids: list[int]):
        self.request_id = er.request_id
        self.tokens: list[int] = list(er.prompt_token_ids)  # prompt, then generated tokens
        self.num_prompt = len(self.tokens)
        self.params = er.params
        self.arrival_time = er.arrival_time
        self.status = Status.WAITING
        self.num_computed = 0  # leading tokens whose KV is in the pool
        self.num_cached = 0  # prompt tokens served by the radix cache on first admission
        self.prefix_len = 0  # leading slots owned (and locked) by the radix tree
        self.last_node: TreeNode | None = None  # the radix node locking prefix_len slots while running
        self.req_idx: int | None = None  # row of the req_to_token table while running
        self.finish_reason: FinishReason | None = None
        self.num_preemptions = 0
        self.first_scheduled_time: float | None = None
        # tokens sampled by steps still in flight (overlap scheduling): their ids are not known
        # here yet; the worker feeds them to the next step from its own device buffer
        self.pending = 0
        self.grammar: GrammarState | None = None  # the matcher of a constrained request (Scheduler.add_request)
        # prompt logprobs: positions scheduled so far (position p scores prompt token p + 1), and
        # the results gathered until the first token's output carries them
        self.plp_done = 0
        self.prompt_lps: list[TokenLogprob] = []
        p = er.params
        # logprobs or logits processing: the scheduler's per-step work for them runs only while
        # such a request exists
        self.special = p.logprobs is not None or p.prompt_logprobs is not None or p.adjusts_logits
        self.last_sample_step = 0  # the step that samples its newest token (pipeline overlap)
        ids = set(er.params.stop_token_ids)
        if not er.params.ignore_eos:
            ids.update(eos_ids)
        self.stop_ids = frozenset(ids)

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt positions whose logprobs are still to be computed (the radix cache is skipped
        for them: a cache hit has no logits)."""
        return self.params.prompt_logprobs is not None and self.plp_done < self.num_prompt - 1
