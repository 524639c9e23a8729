"""From engine deltas to HTTP: `EngineStream` (one engine request for one response: metrics, the
request's one log line, abort when nobody reads any more), the choices of a request opened and
collected together, and server-sent events: one chunk builder for chat and completion chunks, the
choices' events merged, the usage chunk, the error event and `data: [DONE]`."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any, Protocol

import orjson
from starlette.requests import Request

from nanovllmx.engine.protocol import EngineClient, RequestStream
from nanovllmx.errors import EngineOverloadedError, EngineRequestError, EngineUnavailableError
from nanovllmx.metrics import ServeMetrics
from nanovllmx.outputs import StreamDelta, TokenLogprob
from nanovllmx.sampling_params import SamplingParams
from nanovllmx.serve.errors import APIError, bad_request, engine_failed, engine_refused, engine_unavailable
from nanovllmx.serve.logprobs import CompletionLogprobsBuilder, TokenTexts, chat_logprobs
from nanovllmx.serve.mapping import (
    ChoiceResult,
    OpenAIRequest,
    ParserFactory,
    echo_text,
    finish_reason_of,
    param_of,
    usage_of_choices,
)
from nanovllmx.serve.parsers import ChatOutputParser
from nanovllmx.serve.protocol import ChatCompletionRequest, CompletionRequest
from nanovllmx.structured.spec import StructuredError

logger = logging.getLogger("nanovllmx.serve")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class StreamOwner(Protocol):
    """What an EngineStream needs of the replica that opened it."""

    llm: EngineClient
    metrics: ServeMetrics | None
    num_aborted: int  # requests stopped early because their client went away


class EngineStream:
    """The deltas of one engine request, for one HTTP response.

    Whoever stops reading early (a cancelled handler, a closed SSE response, garbage collection of
    a response that never started) aborts the request in the engine, so its KV slots are freed
    within one engine step.
    """

    def __init__(self, server: StreamOwner, deltas: RequestStream, num_prompt: int, t_arrival: float | None = None):
        self.server, self.deltas, self.num_prompt = server, deltas, num_prompt
        self.request_id = deltas.request_id
        self.finished = False
        self.t_arrival = t_arrival if t_arrival is not None else time.perf_counter()  # submitted to the engine
        self.t_first_token: float | None = None
        self.t_last_token: float | None = None
        self.last: StreamDelta | None = None
        self.metrics: ServeMetrics | None = getattr(server, "metrics", None)
        self.peeked: StreamDelta | None = None  # the first delta, read before the response started

    def __aiter__(self) -> EngineStream:
        return self

    async def peek(self) -> None:
        """Read the first delta now (see `first_deltas`); __anext__ returns it first."""
        if self.peeked is None and not self.finished:
            self.peeked = await self.__anext__()

    async def __anext__(self) -> StreamDelta:
        if self.peeked is not None:
            d, self.peeked = self.peeked, None
            return d
        if self.finished:
            raise StopAsyncIteration
        try:
            d = await self.deltas.__anext__()
        except StopAsyncIteration:
            self.finished = True
            raise
        except EngineRequestError as e:  # the engine failed it: nothing left to abort
            self.finished = True
            self._report("error", str(e))
            raise
        except BaseException:  # cancelled (client gone) or anything else: stop it in the engine
            self.close()
            raise
        if d.token_ids:
            now = time.perf_counter()
            m = self.metrics
            if self.t_first_token is None:
                self.t_first_token = now
                if m is not None:
                    m.ttft.observe(now - self.t_arrival)
                    if d.queue_time is not None:
                        m.queue_time.observe(d.queue_time)
            elif m is not None and self.t_last_token is not None:
                # per token: a delta may carry several (stream_interval, a lagging stream)
                m.itl.observe((now - self.t_last_token) / len(d.token_ids))
            self.t_last_token = now
        self.last = d
        if d.finished:
            self.finished = True
            self._report(d.finish_reason)
        return d

    def close(self) -> None:
        """Abort the request unless it finished. Idempotent, callable from any context."""
        if self.finished:
            return
        self.finished = True
        self.server.llm.abort(self.request_id)
        self.server.num_aborted += 1
        self._report("abort", "client disconnected")

    def _report(self, outcome: str | None, detail: str = "") -> None:
        """One log line per request when it ends (the only one), and its outcome metrics."""
        d, now = self.last, time.perf_counter()
        ttft = f"{self.t_first_token - self.t_arrival:.3f}s" if self.t_first_token is not None else "-"
        queue = f" queue={d.queue_time:.3f}s" if d is not None and d.queue_time is not None else ""
        logger.info(
            "request %s %s: prompt=%d cached=%d generated=%d ttft=%s total=%.3fs%s%s",
            self.request_id,
            outcome,
            self.num_prompt,
            d.num_cached_tokens if d else 0,
            d.num_output_tokens if d else 0,
            ttft,
            now - self.t_arrival,
            queue,
            f" ({detail})" if detail else "",
        )
        if self.metrics is not None:
            with suppress(Exception):
                self.metrics.request_finished(outcome, now - self.t_arrival)

    async def aclose(self) -> None:
        self.close()

    def __del__(self) -> None:
        with suppress(Exception):
            self.close()


# =============================================================================================== a request's choices
def open_stream(server: StreamOwner, prompt_ids: list[int], params: SamplingParams, rid: str) -> EngineStream:
    """Submit to the engine now (on the event loop that reads the stream); raise APIError (400, 503)
    for a request it refuses."""
    t_arrival = time.perf_counter()
    try:
        deltas = server.llm.submit(prompt_ids, params, request_id=rid)
    except StructuredError as e:  # the grammar does not compile: the field that asked for it
        raise bad_request(str(e), e.param, "invalid_grammar") from e
    except (ValueError, TypeError) as e:
        raise bad_request(str(e), param_of(str(e)) or "prompt") from e
    except (EngineOverloadedError, EngineUnavailableError) as e:
        raise engine_refused(rid, e) from e
    return EngineStream(server, deltas, len(prompt_ids), t_arrival)


def open_choices(
    server: StreamOwner, prompts: list[list[int]], params: list[SamplingParams], rid: str, n: int
) -> list[EngineStream]:
    """One engine request per choice, n per prompt, prompt-major (OpenAI's choice index: prompt index
    * n + j); a prompt's choices share its KV through the radix cache. With a seed, a prompt's choice
    j uses seed + j: reproducible, and the choices differ. All or none."""
    streams: list[EngineStream] = []
    total = len(prompts) * n
    try:
        for k, (prompt_ids, sp) in enumerate(zip(prompts, params)):
            for j in range(n):
                p = sp if (n == 1 or sp.seed is None) else dataclasses.replace(sp, seed=sp.seed + j)
                i = k * n + j
                streams.append(open_stream(server, prompt_ids, p, rid if total == 1 else f"{rid}-{i}"))
    except BaseException:
        for st in streams:
            st.close()
        raise
    return streams


async def engine_is_down(server: StreamOwner) -> str | None:
    """Why the engine cannot serve (dead, or shutting down), or None. Off the event loop: on Ray it
    asks the scheduler actor (at once when the actor is known dead)."""

    def check() -> str | None:
        try:
            server.llm.check_health()
        except EngineUnavailableError as e:
            return str(e)
        except Exception as e:  # noqa: BLE001 - a check that cannot run: the engine cannot serve either
            return f"{type(e).__name__}: {e}"
        return None

    return await asyncio.to_thread(check)


async def request_failed(server: StreamOwner, e: EngineRequestError) -> APIError:
    """The HTTP error for a request the engine failed before anything reached the client: 503 +
    Retry-After when the engine died under it (a retry is safe and lands on a healthy replica), else
    500 (the engine runs on, but failed this request)."""
    down = await engine_is_down(server)
    if down is not None:
        return engine_unavailable(f"{e} (the engine: {down})")
    return engine_failed(e)


async def first_deltas(server: StreamOwner, streams: list[EngineStream]) -> None:
    """Wait for each stream's first delta before a streamed response starts (it could not send a
    token earlier anyway), so that a request the engine fails before its first token gets an HTTP
    error (503 when the engine died) rather than a 200 and an error event."""
    try:
        await asyncio.gather(*(st.peek() for st in streams))
    except BaseException as e:
        for st in streams:
            st.close()
        if isinstance(e, EngineRequestError):
            raise await request_failed(server, e) from e
        raise


async def collect(
    streams: list[EngineStream], raw_request: Request | None, server: StreamOwner | None = None
) -> list[ChoiceResult]:
    """Run non-streaming requests (a response's choices) to their end; abort them in the engine if
    the client disconnects (seen by watching the ASGI receive channel, or by Serve cancelling
    the handler)."""

    async def consume_one(stream: EngineStream) -> ChoiceResult:
        texts: list[str] = []
        ids: list[int] = []
        lps: list[TokenLogprob] | None = None
        plps = None
        last = None
        async for d in stream:
            texts.append(d.text)
            ids.extend(d.token_ids)
            if d.logprobs is not None:
                lps = (lps or []) + d.logprobs
            plps = plps or d.prompt_logprobs
            last = d
        assert last is not None  # a request ends with its finished delta, or raises
        return ChoiceResult("".join(texts), ids, last, lps, plps)

    async def consume() -> list[ChoiceResult]:
        return await asyncio.gather(*(consume_one(st) for st in streams))

    async def disconnected() -> None:
        if raw_request is None:  # called through a handle (LLMIngress): Serve cancels us instead
            await asyncio.Event().wait()
        while raw_request is not None:
            message = await raw_request.receive()
            if message.get("type") == "http.disconnect":
                return

    work = asyncio.ensure_future(consume())
    watch = asyncio.ensure_future(disconnected())
    gone = False
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when the handler is cancelled
        watch.cancel()
        if not work.done():
            gone = True
            work.cancel()
            for st in streams:
                st.close()
    if gone:
        raise APIError(499, "client disconnected", "invalid_request_error", None, "client_disconnected")
    try:
        return list(work.result())
    except BaseException as e:
        for st in streams:  # the other choices are of no use without the failed one
            st.close()
        if isinstance(e, EngineRequestError):  # nothing reached the client: 503 if the engine died
            raise (await request_failed(server, e) if server is not None else engine_failed(e)) from e
        raise


# =============================================================================================== server-sent events
def sse(obj: dict[str, Any]) -> str:
    # orjson: compact UTF-8 JSON like json.dumps(ensure_ascii=False, separators=(",", ":")) in a
    # tenth of the time (3.3 -> 0.4 us a chunk; a chunk per token per stream is the replica's hot path)
    return "data: " + orjson.dumps(obj).decode() + "\n\n"


@dataclasses.dataclass(frozen=True)
class ChunkHead:
    """What every chunk of a streamed response repeats."""

    id: str
    object: str  # "chat.completion.chunk" | "text_completion"
    created: int
    model: str

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": choices}


class ChoiceChunks:
    """The chunks of one streamed choice, chat or completion. Shared: the envelope, the choice's
    index / logprobs / finish_reason, return_token_ids (the ids of each delta; the prompt's once)
    and stream_options (a `usage` key on every chunk with include_usage: the usage so far with
    continuous_usage_stats, else null). Different: chat opens with a role chunk that carries the
    prompt's ids and puts text in `delta`; completions put it in `text` and the prompt's ids in the
    first choice."""

    def __init__(
        self,
        head: ChunkHead,
        body: OpenAIRequest,
        prompt_ids: list[int],
        index: int,
        texts: TokenTexts,
        parser: ChatOutputParser | None = None,
    ):
        opts = body.stream_options
        self.parser = parser  # chat: reasoning_content / content / tool_calls deltas
        self.head, self.prompt_ids, self.index, self.texts = head, prompt_ids, index, texts
        self.chat = isinstance(body, ChatCompletionRequest)
        self.include_usage = bool(opts and opts.include_usage)
        self.continuous = self.include_usage and bool(opts and opts.continuous_usage_stats)
        self.token_ids = bool(body.return_token_ids)
        self.sent_prompt = False
        self.last: StreamDelta | None = None
        # logprobs: chat's top_logprobs, or a completion's running builder; echo: the prompt goes first
        self.chat_top = (body.top_logprobs or 0) if isinstance(body, ChatCompletionRequest) and body.logprobs else None
        self.builder = None
        self.echo = False
        if isinstance(body, CompletionRequest):
            self.echo = bool(body.echo)
            if body.logprobs is not None:
                self.builder = CompletionLogprobsBuilder(texts, body.logprobs)
        self.wants_lp = self.builder is not None or self.chat_top is not None

    def _logprobs(self, d: StreamDelta | None, echoed: bool) -> dict[str, Any] | None:
        if d is None:
            return None
        if self.chat_top is not None:
            return chat_logprobs(self.texts, d.logprobs or [], self.chat_top)
        if self.builder is not None:
            seq: list[TokenLogprob | int] = list(d.logprobs or [])
            if echoed:
                seq = self.builder.echoed(self.prompt_ids, d.prompt_logprobs) + seq
            return self.builder.build(seq)
        return None

    def _chunk(
        self, content: dict[str, Any], finish: str | None, token_ids: list[int] | None, logprobs: Any = None
    ) -> dict[str, Any]:
        choice = {"index": self.index, **content, "logprobs": logprobs, "finish_reason": finish}
        if self.token_ids and token_ids is not None:
            choice["token_ids"] = token_ids
            if not self.chat and not self.sent_prompt:
                choice["prompt_token_ids"], self.sent_prompt = self.prompt_ids, True
        c = self.head.chunk([choice])
        if self.include_usage:
            c["usage"] = (
                usage_of_choices([self.last], len(self.prompt_ids), reasoning=self.reasoning_tokens()).dump()
                if self.continuous
                else None
            )
        return c

    def reasoning_tokens(self) -> int | None:
        p = self.parser
        return p.reasoning_tokens if p is not None and p.reasoning is not None else None

    def first(self) -> dict[str, Any] | None:
        """The chunk before any delta: chat's role chunk (as vLLM: with the prompt's ids); none for completions."""
        if not self.chat:
            return None
        c = self._chunk({"delta": {"role": "assistant", "content": ""}}, None, None)
        if self.token_ids:
            c["prompt_token_ids"] = self.prompt_ids
        return c

    def of(self, d: StreamDelta) -> dict[str, Any] | None:
        """The chunk of a delta, or None when it has nothing to say (no text, ids or end)."""
        self.last = d
        finish: str | None = d.finish_reason if d.finished else None
        text, echoed = d.text, False
        if self.echo:  # the first chunk of an echoed completion starts with the prompt
            text, echoed, self.echo = echo_text(self.texts, self.prompt_ids) + text, True, False
        content: dict[str, Any]
        if self.parser is not None:  # chat: the text split into reasoning_content / content / tool_calls
            delta = self.parser.feed(text, d.token_ids)
            if d.finished:
                for k, v in self.parser.finish().items():
                    delta[k] = delta.get(k, type(v)()) + v
                finish = finish_reason_of(finish, self.parser.num_tool_calls)
            content, has_text = {"delta": delta}, bool(delta)
        else:
            content = ({"delta": {"content": text} if text else {}}) if self.chat else {"text": text}
            has_text = bool(text)
        wants_lp = self.wants_lp
        if not (has_text or d.finished or ((self.token_ids or wants_lp) and d.token_ids)):
            return None
        lp = self._logprobs(d, echoed) if wants_lp else None
        return self._chunk(content, finish, d.token_ids, lp)


async def choice_events(stream: EngineStream, chunks: ChoiceChunks) -> AsyncIterator[str]:
    """One choice's events (the response's usage chunk comes from merged_events)."""
    first = chunks.first()
    if first is not None:
        yield sse(first)
    async for d in stream:
        c = chunks.of(d)
        if c is not None:
            yield sse(c)


async def merged_events(
    choices: list[AsyncIterator[str]],
    streams: list[EngineStream],
    head: ChunkHead,
    include_usage: bool,
    n_prompt: int,
    n: int | None = None,
    chunks: list[ChoiceChunks] | None = None,
) -> AsyncIterator[str]:
    """The events of every choice as they come, then (stream_options.include_usage) one usage
    chunk for the whole response."""
    if len(choices) == 1:
        async for e in choices[0]:
            yield e
    else:
        q: asyncio.Queue[str | BaseException | None] = asyncio.Queue()

        async def pump(gen: AsyncIterator[str]) -> None:
            try:
                async for e in gen:
                    await q.put(e)
                await q.put(None)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
                await q.put(e)

        tasks = [asyncio.ensure_future(pump(g)) for g in choices]
        try:
            left = len(tasks)
            while left:
                item = await q.get()
                if item is None:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()
    if include_usage:
        counts = [c.reasoning_tokens() for c in chunks or []]
        reasoning = sum(k for k in counts if k is not None) if any(k is not None for k in counts) else None
        usage = usage_of_choices([st.last for st in streams], n_prompt, n, reasoning)
        yield sse({**head.chunk([]), "usage": usage.dump()})


async def guarded_events(events: AsyncIterator[str], streams: list[EngineStream]) -> AsyncIterator[str]:
    """An SSE body: the events, an OpenAI error event if the engine failed mid-stream, always
    `data: [DONE]`; closing the body aborts the requests when the client went away."""
    try:
        async for e in events:
            yield e
    except EngineRequestError as e:  # 503 engine_unavailable when the engine died, else 500 engine_error
        yield sse((await request_failed(streams[0].server, e)).body())
    except APIError as e:
        yield sse(e.body())
    finally:
        for st in streams:  # a no-op when finished; aborts when the client went away mid-stream
            st.close()
    yield "data: [DONE]\n\n"


def sse_body(
    body: OpenAIRequest,
    streams: list[EngineStream],
    head: ChunkHead,
    prompts: list[list[int]],
    texts: TokenTexts,
    parser_of: ParserFactory | None = None,
) -> AsyncIterator[str]:
    """The whole SSE body of a streamed response with one choice per stream (n per prompt); chat
    deltas through `parser_of`'s output parsers (reasoning, tool calls)."""
    n = max(len(streams) // max(len(prompts), 1), 1)
    chunks = [
        ChoiceChunks(
            head, body, prompts[i // n], i, texts, parser_of(body, prompts[i // n]) if parser_of is not None else None
        )
        for i in range(len(streams))
    ]
    events = [choice_events(st, c) for st, c in zip(streams, chunks)]
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    n_prompt = sum(map(len, prompts))
    return guarded_events(merged_events(events, streams, head, include_usage, n_prompt, n, chunks), streams)
