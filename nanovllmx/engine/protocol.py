"""The two interfaces of the engine, typed.

- `EngineClient`: what a caller (the Serve app, the CLI, a script) uses. Text or token ids in,
  finished outputs or streamed deltas out. Implemented by `nanovllmx.LLM`, whichever executor runs
  the engine underneath.
- `CoreClient`: what `LLM` uses to reach an engine core: ordered request/abort messages in, per-step
  `EngineOutput`s out through a sink callback. Implemented in-process by `EngineCore` and across
  processes by `RayCoreClient` (the core inside a Ray scheduler actor).

Every method that can refuse raises a typed error from `nanovllmx.errors` (or ValueError/TypeError
for a bad request); none returns an error value.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from nanovllmx.scheduler.request import EngineOutput, EngineRequest

if TYPE_CHECKING:
    from nanovllmx.config import EngineConfig
    from nanovllmx.outputs import RequestOutput, StreamDelta
    from nanovllmx.sampling_params import SamplingParams
    from nanovllmx.structured.spec import GrammarSpec

Prompt = str | list[int]
OutputSink = Callable[[list[EngineOutput]], None]


class RequestStream(Protocol):
    """A submitted request's deltas. Iterating ends after the delta with `finished=True`; an engine
    failure raises `EngineRequestError`. Closing it (or cancelling the consumer) before the end
    aborts the request in the engine."""

    request_id: str

    def __aiter__(self) -> RequestStream: ...
    async def __anext__(self) -> StreamDelta: ...
    async def aclose(self) -> None: ...


@runtime_checkable
class EngineClient(Protocol):
    config: EngineConfig
    tokenizer: Any  # a transformers tokenizer: the Serve app renders chat templates with it

    def encode(self, prompt: Prompt) -> list[int]: ...

    def compile_grammar(self, spec: GrammarSpec) -> None:
        """Compile a request's grammar into the client's cache (so `submit` finds it there); raises
        StructuredError (a ValueError naming the field) if the grammar library refuses it. Blocking:
        the Serve app runs it off the event loop."""
        ...

    def submit(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None
    ) -> RequestStream:
        """Submit now (call it on the event loop that consumes the stream). Raises at once for a
        request the engine refuses: ValueError/TypeError (bad prompt or parameters),
        EngineOverloadedError (queue full), EngineUnavailableError (shut down or dead)."""
        ...

    def stream(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[StreamDelta]: ...

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]: ...

    def abort(self, request_id: str) -> None: ...
    def stats(self) -> dict[str, Any]: ...

    def prefix_summary(self, limit: int = 4096) -> list[int]:
        """The newest `limit` prefix block hashes of the engine's radix tree (what a replica
        publishes for the request router, serve/router.py)."""
        ...

    def check_health(self) -> None:
        """Return if the engine can serve; else raise EngineUnavailableError saying why."""
        ...

    def attachment(self) -> Any:
        """What another process passes as `LLM(attach_to=...)` to be one more client of this engine
        (an engine on Ray only: ValueError otherwise). Opaque to callers; picklable."""
        ...

    def shutdown(self, timeout: float = 0.0) -> None: ...


@runtime_checkable
class CoreClient(Protocol):
    def add_request(self, request: EngineRequest) -> None: ...
    def abort(self, request_id: str) -> None: ...
    def stats(self) -> dict[str, Any]: ...
    def prefix_summary(self, limit: int) -> list[int]: ...

    def check_health(self) -> None:
        """Return if the core can serve; else raise EngineUnavailableError saying why."""
        ...

    def shutdown(self) -> None: ...
