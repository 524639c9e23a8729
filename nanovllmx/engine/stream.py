"""The deltas of one submitted request (`LLM.submit`), as an async iterator: it implements the
`RequestStream` protocol (engine/protocol.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import cast

from nanovllmx.engine.output_processor import RequestState, StreamItem
from nanovllmx.errors import EngineRequestError
from nanovllmx.outputs import StreamDelta


class DeltaStream:
    """One submitted request's deltas (`LLM.submit`). With `stream_interval` N, the first token goes
    at once, then a delta every N tokens; a consumer that fell behind takes everything queued as one
    delta, so under load a stream sends fewer, larger chunks instead of falling further behind."""

    def __init__(self, state: RequestState, interval: int, abort: Callable[[str], None]):
        self._st, self._interval, self._abort = state, interval, abort
        self.request_id = state.request_id
        self._finished = False
        self._sent = False  # the first delta went out
        self._held: list[StreamDelta] = []  # deltas waiting for stream_interval tokens

    def __aiter__(self) -> DeltaStream:
        return self

    async def __anext__(self) -> StreamDelta:
        if self._finished:
            raise StopAsyncIteration
        try:
            return await self._next()
        except BaseException:  # failed, or cancelled (the consumer went away): stop it in the engine
            self._close()
            raise

    async def _next(self) -> StreamDelta:
        st, interval = self._st, self._interval
        assert st.queue is not None
        while True:
            got: list[StreamItem] = [*self._held, await st.queue.get()]
            self._held = []
            while not st.queue.empty():
                got.append(st.queue.get_nowait())
            for it in got:
                if isinstance(it, tuple):  # (delta, error): the engine failed the request
                    self._finished = True
                    raise EngineRequestError(f"request {st.request_id} failed: {it[1]}")
            items = cast("list[StreamDelta]", got)  # no (delta, error) among them: checked above
            if st.finish_reason == "abort":  # drop what was queued before the abort, keep its final delta
                items = [it for it in items if it.finished][:1]
                if not items:
                    continue
            if self._sent and not items[-1].finished and sum(len(it.token_ids) for it in items) < interval:
                self._held = items
                continue
            self._sent = True
            d = items[0]
            if len(items) > 1:
                ids = [t for it in items for t in it.token_ids]
                lps = [lp for it in items for lp in (it.logprobs or [])]
                d = dataclasses.replace(
                    items[-1],
                    token_ids=ids,
                    text="".join(it.text for it in items),
                    logprobs=lps if any(it.logprobs is not None for it in items) else None,
                    prompt_logprobs=next((it.prompt_logprobs for it in items if it.prompt_logprobs), None),
                )
            self._finished = d.finished
            return d

    def _close(self) -> None:
        if not self._finished:
            self._finished = True
            self._abort(self.request_id)

    async def aclose(self) -> None:
        """Abort the request unless it finished. Idempotent."""
        self._close()

    def __del__(self) -> None:
        try:
            self._close()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass
