"""A request as the scheduler sees it: token ids and KV bookkeeping, no text."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from nanovllmx.sampling_params import SamplingParams


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


@dataclass
class EngineOutput:
    """What the engine core reports per step for one request (picklable)."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    queue_time: float | None = None  # on a request's first token: seconds from arrival to first scheduled


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
        self.last_node = None
        self.req_idx: int | None = None  # row of the req_to_token table while running
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        self.first_scheduled_time: float | None = None
        # tokens sampled by steps still in flight (overlap scheduling): their ids are not known
        # here yet; the worker feeds them to the next step from its own device buffer
        self.pending = 0
        ids = set(er.params.stop_token_ids)
        if not er.params.ignore_eos:
            ids.update(eos_ids)
        self.stop_ids = frozenset(ids)

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt
