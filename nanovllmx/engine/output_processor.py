"""Client-side request state: collects each request's tokens, detokenizes incrementally, applies
stop strings, and hands results to whoever waits (a blocking `generate` or an async stream)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import cast

from nanovllmx.engine.detokenizer import IncrementalDetokenizer, TokenDecoder
from nanovllmx.errors import EngineRequestError
from nanovllmx.outputs import RequestOutput, StreamDelta
from nanovllmx.sampling_params import SamplingParams
from nanovllmx.scheduler.request import EngineOutput, FinishReason, TokenLogprob

# what a stream's queue carries: a delta, or (delta, error) when the engine failed the request
StreamItem = StreamDelta | tuple[StreamDelta, str]


@dataclass
class RequestState:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    detok: IncrementalDetokenizer | None  # None: decode once at the end (offline, no stop strings)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_cached_tokens: int = 0
    queue_time: float | None = None  # arrival to first scheduled (seconds), from the first token on
    text: str | None = None  # the whole output's text, decoded when it finished (no detok)
    logprobs: list[TokenLogprob] | None = None  # with SamplingParams.logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with SamplingParams.prompt_logprobs
    # delivery: an asyncio queue of StreamDelta (streaming) or an event (blocking generate)
    queue: asyncio.Queue[StreamItem] | None = None
    loop: asyncio.AbstractEventLoop | None = None
    done: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None  # perf_counter when the first token reached this process


def _deliver(items: list[tuple[asyncio.Queue[StreamItem], StreamItem]]) -> None:
    """On the stream's event loop: hand each delta to its request's queue."""
    for q, d in items:
        q.put_nowait(d)


class OutputProcessor:
    def __init__(self, tokenizer: TokenDecoder) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}
        self.lock = threading.Lock()

    def add(self, state: RequestState) -> None:
        with self.lock:
            self.states[state.request_id] = state

    def pop(self, request_id: str) -> RequestState | None:
        with self.lock:
            return self.states.pop(request_id, None)

    def process(self, outs: list[EngineOutput]) -> list[str]:
        """Apply one step's outputs. Returns request ids the engine must abort (hit a stop string)."""
        to_abort: list[str] = []
        # stream deltas per event loop: one thread-safe wake-up per loop and call, not one per token
        # (each wake-up is a syscall; per token they were a fifth of the serving process's CPU)
        deliveries: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[StreamItem], StreamItem]]] = {}
        for o in outs:
            st = self.states.get(o.request_id)
            if st is None:  # aborted by the client already
                continue
            st.num_cached_tokens = o.num_cached_tokens
            if o.queue_time is not None:
                st.queue_time = o.queue_time
            if st.first_token_at is None and o.new_token_ids:
                st.first_token_at = time.perf_counter()
            st.token_ids.extend(o.new_token_ids)
            if o.logprobs is not None:
                st.logprobs = (st.logprobs or []) + o.logprobs if st.queue is None else o.logprobs
            prompt_lps: list[TokenLogprob | None] | None = None
            if o.prompt_logprobs is not None:
                prompt_lps = [None, *o.prompt_logprobs]
                st.prompt_logprobs = prompt_lps
            finish = o.finish_reason
            text = ""
            if st.detok is not None:
                text = st.detok.add(o.new_token_ids)
                if st.detok.stopped and finish is None:
                    finish = "stop"
                    to_abort.append(o.request_id)
                if finish is not None:
                    text += st.detok.flush()
            if finish is not None:
                st.finish_reason, st.error = finish, o.error
                self.pop(o.request_id)
            if st.queue is not None:
                assert st.loop is not None  # a stream's queue and loop are set together
                d = StreamDelta(
                    o.request_id,
                    list(o.new_token_ids),
                    text,
                    finish is not None,
                    finish,
                    len(st.prompt_token_ids),
                    st.num_cached_tokens,
                    len(st.token_ids),
                    st.queue_time,
                    o.logprobs,
                    prompt_lps,
                )
                item: StreamItem = (d, o.error) if o.error else d  # (delta, error): the stream raises it
                deliveries.setdefault(st.loop, []).append((st.queue, item))
            elif finish is not None:
                if st.detok is None and not o.error:  # decode here, while the GPU runs the other requests
                    st.text = cast(
                        str, self.tokenizer.decode(st.token_ids, skip_special_tokens=st.params.skip_special_tokens)
                    )
                st.done.set()
        for loop, items in deliveries.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: nobody is waiting for these
                pass
        return to_abort

    def result(self, st: RequestState) -> RequestOutput:
        if st.error:
            raise EngineRequestError(f"request {st.request_id} failed: {st.error}")
        text = st.detok.text if st.detok is not None else st.text
        if text is None:
            text = cast(str, self.tokenizer.decode(st.token_ids, skip_special_tokens=st.params.skip_special_tokens))
        return RequestOutput(
            st.request_id,
            st.prompt_token_ids,
            st.token_ids,
            text,
            st.finish_reason,
            st.num_cached_tokens,
            st.logprobs,
            st.prompt_logprobs,
            None if st.first_token_at is None else st.first_token_at - st.submitted,
        )
