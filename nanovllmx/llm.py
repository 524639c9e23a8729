"""The client API: `LLM` tokenizes, submits requests to an engine core (in this process, or in a
Ray scheduler actor), and hands back finished outputs (`generate`) or deltas (`stream`)."""

from __future__ import annotations

import asyncio
import atexit
import functools
import itertools
import logging
import queue
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, cast

from nanovllmx.config import EngineConfig
from nanovllmx.engine.detokenizer import IncrementalDetokenizer
from nanovllmx.engine.encoder import PromptEncoder
from nanovllmx.engine.output_processor import OutputProcessor, RequestState
from nanovllmx.engine.protocol import CoreClient, Prompt
from nanovllmx.engine.stream import DeltaStream
from nanovllmx.errors import EngineOverloadedError, EngineRequestError, EngineUnavailableError
from nanovllmx.outputs import RequestOutput, StreamDelta
from nanovllmx.sampling_params import RequestLimits, SamplingParams
from nanovllmx.scheduler.request import EngineOutput, EngineRequest, check_prompt
from nanovllmx.structured.grammar import get_compiler
from nanovllmx.structured.spec import GrammarSpec

if TYPE_CHECKING:
    from nanovllmx.distributed.ray_engine import EngineAttachment

logger = logging.getLogger(__name__)

_C = EngineConfig  # the defaults below are EngineConfig's: decided there only


class LLM:
    """The engine's client API (`EngineClient`, engine/protocol.py). Every argument but `attach_to`
    and `clients` is an `EngineConfig` field (config.py documents them all); the common ones are
    named here.

    `attach_to`: another process's engine (`other_llm.attachment()`, executor "ray" only): this LLM
    then starts no engine of its own; it is one more client of that engine's scheduler actor (its
    own tokenizer, detokenization and streaming), and its shutdown leaves the engine running. The
    config must describe the same model (it is used for tokenizing and limits only).

    `clients`: how many LLMs submit to this engine (Serve's frontends). Each then admits its share,
    ceil((max_bs + max_waiting_requests) / clients) outstanding requests, so that together they
    hold the engine's bound, not `clients` times it."""

    def __init__(
        self,
        model: str,
        device: str = _C.device,
        dtype: str = _C.dtype,
        gpu_memory_utilization: float = _C.gpu_memory_utilization,
        max_bs: int = _C.max_bs,
        context_len: int | None = _C.context_len,
        enforce_eager: bool = _C.enforce_eager,
        tp_size: int = _C.tp_size,
        pp_size: int = _C.pp_size,
        executor: str = _C.executor,
        attach_to: EngineAttachment | None = None,
        clients: int = 1,
        **kwargs: Any,
    ):
        from transformers import AutoTokenizer

        if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
            raise ValueError(f"clients must be an integer >= 1, got {clients!r}")
        self.config = EngineConfig(
            model=model,
            device=device,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_bs=max_bs,
            context_len=context_len,
            enforce_eager=enforce_eager,
            tp_size=tp_size,
            pp_size=pp_size,
            executor=executor,  # type: ignore[arg-type]  # checked by EngineConfig
            **kwargs,
        )
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.encoder = PromptEncoder(self.tokenizer, self.config.max_len)
        c = self.config
        self.limits = RequestLimits(c.vocab_size, c.max_stop_strings, c.max_stop_str_len, c.max_stop_token_ids)
        self.processor = OutputProcessor(self.tokenizer)
        self._outq: queue.Queue[list[EngineOutput] | None] = queue.Queue()
        self._ids = itertools.count()
        self._id_prefix = f"req-{uuid.uuid4().hex[:8]}"  # ids unique across LLM instances, one urandom call
        self.core: CoreClient
        if attach_to is not None and self.config.executor != "ray":
            raise ValueError("attach_to (an engine running on Ray) needs executor='ray'")
        if self.config.executor == "local":
            from nanovllmx.engine.core import EngineCore
            from nanovllmx.engine.executor import LocalExecutor

            self.core = EngineCore(self.config, LocalExecutor(self.config), self._outq.put)
        else:
            from nanovllmx.distributed.ray_engine import RayCoreClient

            self.core = RayCoreClient(self.config, self._outq.put, attach_to)
        self._closed = False
        # admission: the closed flag and the outstanding count are checked and a request submitted
        # under one lock, so shutdown() never misses a request that slipped in
        self._admit = threading.Lock()
        self._clients = clients
        self.max_outstanding = -(-(self.config.max_bs + self.config.max_waiting_requests) // clients)
        self._out_thread = threading.Thread(target=self._output_loop, name="nanovllmx-output", daemon=True)
        self._out_thread.start()
        # an LLM left open is shut down at interpreter exit, before Ray's own exit hook disconnects
        # the process (Ray registered it when imported, earlier, so it runs later): no engine thread
        # or Ray call is left running while the interpreter finalises
        self._exit_hook = functools.partial(_shutdown_at_exit, weakref.ref(self))
        atexit.register(self._exit_hook)

    # ---------------------------------------------------------------- helpers
    def _output_loop(self) -> None:
        while True:
            outs = self._outq.get()
            if outs is None:
                return
            try:  # merge whatever else is queued: one pass per burst
                while True:
                    more = self._outq.get_nowait()
                    if more is None:
                        self._outq.put(None)
                        break
                    outs = outs + more
            except queue.Empty:
                pass
            for rid in self.processor.process(outs):
                self.core.abort(rid)

    def encode(self, prompt: Prompt) -> list[int]:
        return self.encoder.encode(prompt)

    def _check_params(self, params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError("sampling params must be a SamplingParams")
        params.validate(self.limits)
        if params.structured is not None:  # compile now (cached): a bad grammar is the caller's error
            self.compile_grammar(params.structured)

    def compile_grammar(self, spec: GrammarSpec) -> None:
        """Compile (or find in the cache) a grammar; StructuredError if the library refuses it."""
        c = self.config
        get_compiler(c.model, c.vocab_size, c.eos_token_ids).compile(spec)

    def _submit(
        self,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str | None,
        streaming: bool,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> RequestState:
        if self._closed:
            raise EngineUnavailableError("this LLM has been shut down (or is shutting down): it takes no new requests")
        self._check_params(params)
        ids = self.encode(prompt)
        check_prompt(ids, self.config.max_len, self.config.vocab_size)
        rid = request_id or f"{self._id_prefix}-{next(self._ids)}"
        er = EngineRequest(rid, ids, params)
        detok = (
            IncrementalDetokenizer(
                self.tokenizer,
                params.stop,
                params.skip_special_tokens,
                params.include_stop_str_in_output,
                params.min_tokens,
            )
            if (streaming or params.stop)
            else None
        )
        st = RequestState(rid, ids, params, detok)
        if streaming:
            st.queue, st.loop = asyncio.Queue(), loop
        with self._admit:
            if self._closed:
                raise EngineUnavailableError(
                    "this LLM has been shut down (or is shutting down): it takes no new requests"
                )
            if rid in self.processor.states:
                raise ValueError(f"request id {rid!r} is already in use")
            n = len(self.processor.states)
            if n >= self.max_outstanding:  # refused here, cheaply: nothing reaches the engine
                raise EngineOverloadedError(
                    f"the engine is overloaded: {n} requests outstanding here (max_bs={self.config.max_bs} "
                    f"running + max_waiting_requests={self.config.max_waiting_requests} waiting"
                    + (f", shared by {self._clients} clients" if self._clients > 1 else "")
                    + "); retry later"
                )
            self.processor.add(st)
            try:
                self.core.add_request(er)
            except BaseException:
                self.processor.pop(rid)
                raise
        return st

    # ---------------------------------------------------------------- public API
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [cast(Prompt, prompts)]  # one prompt
        prompts = list(cast(Sequence[Prompt], prompts))
        if sampling_params is None:
            sampling_params = SamplingParams()
        params: list[SamplingParams] = (
            list(sampling_params)
            if isinstance(sampling_params, (list, tuple))
            else [cast(SamplingParams, sampling_params)] * len(prompts)
        )
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        for sp in params:  # fail before anything is submitted
            self._check_params(sp)
        token_prompts = [self.encode(p) for p in prompts]
        states: list[RequestState] = []
        oldest = 0  # states[:oldest] are done
        try:
            for p, sp in zip(token_prompts, params):
                # a batch larger than the engine's queue is submitted as earlier requests finish
                while len(self.processor.states) >= self.max_outstanding:
                    while oldest < len(states) and states[oldest].done.is_set():
                        oldest += 1
                    if oldest == len(states):  # full of other callers' requests: _submit refuses
                        break
                    states[oldest].done.wait(0.05)
                states.append(self._submit(p, sp, None, streaming=False))
        except BaseException:
            for st in states:
                self.abort(st.request_id)
            raise
        show = use_tqdm if use_tqdm is not None else len(prompts) >= 64
        bar = None
        if show:
            from tqdm import tqdm

            bar = tqdm(total=len(states), desc="Generating", unit="req", dynamic_ncols=True)
        try:
            for st in states:
                st.done.wait()
                if bar is not None:
                    bar.update(1)
        except KeyboardInterrupt:
            for st in states:
                self.abort(st.request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [self.processor.result(st) for st in states]

    def submit(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None
    ) -> DeltaStream:
        """Submit a request now and return its deltas (an async iterator; closing it early aborts the
        request). Call it on the event loop that consumes the deltas. A refused request raises here:
        ValueError/TypeError, EngineOverloadedError or EngineUnavailableError."""
        loop = asyncio.get_running_loop()
        st = self._submit(prompt, sampling_params or SamplingParams(), request_id, True, loop)
        return DeltaStream(st, self.config.stream_interval, self.abort)

    async def stream(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[StreamDelta]:
        """Yield deltas as tokens are sampled (submitted when first iterated). Cancelling the
        consumer aborts the request."""
        rs = self.submit(prompt, sampling_params, request_id)
        try:
            async for d in rs:
                yield d
        finally:
            await rs.aclose()

    def abort(self, request_id: str) -> None:
        """Stop a request now; its KV slots are freed within one engine step."""
        st = self.processor.pop(request_id)
        self.core.abort(request_id)
        if st is None:
            return
        st.finish_reason = "abort"
        if st.queue is None:
            st.done.set()
        else:  # end the stream with a final delta, or its consumer waits forever
            assert st.loop is not None  # a stream's queue and loop are set together
            d = StreamDelta(
                request_id, [], "", True, "abort", len(st.prompt_token_ids), st.num_cached_tokens, len(st.token_ids)
            )
            try:
                st.loop.call_soon_threadsafe(st.queue.put_nowait, d)
            except RuntimeError:  # the stream's event loop is closed: nobody is waiting
                pass

    def stats(self) -> dict:
        d = self.core.stats()
        d["num_outstanding_requests"] = len(self.processor.states)  # submitted here, no outcome yet
        return d

    def prefix_summary(self, limit: int = 4096) -> list[int]:
        """The newest `limit` chained hashes of the prefix blocks (64 tokens) held by the engine's
        radix tree (scheduler/radix_cache.py `block_hashes`): what a Serve replica publishes for the
        request router (serve/router.py)."""
        return self.core.prefix_summary(limit)

    def attachment(self) -> EngineAttachment:
        """What `LLM(attach_to=...)` in another process needs to share this engine (executor "ray")."""
        from nanovllmx.distributed.ray_engine import RayCoreClient

        if not isinstance(self.core, RayCoreClient):
            raise ValueError("only an engine running on Ray (executor='ray') can be shared with other processes")
        return self.core.attachment()

    def check_health(self) -> None:
        """Return if the engine can serve; else raise EngineUnavailableError saying why."""
        if self._closed:
            raise EngineUnavailableError("the engine has been shut down")
        if not self._out_thread.is_alive():
            raise EngineUnavailableError("the engine's output loop has stopped")
        self.core.check_health()

    def shutdown(self, timeout: float = 0.0) -> None:
        """Stop the engine gracefully. New requests raise `EngineUnavailableError` at once; requests
        in flight may finish for up to `timeout` seconds; those still running then end with
        finish_reason "abort" (a stream gets its final delta, `generate` returns them). Then the
        engine stops and releases its workers and KV cache (on Ray: the actors and the placement
        group). Idempotent."""
        with self._admit:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self._exit_hook)
        deadline = time.monotonic() + max(0.0, float(timeout))
        while self.processor.states and time.monotonic() < deadline:
            time.sleep(0.01)
        left = list(self.processor.states)
        for rid in left:
            self.abort(rid)
        if left:
            logger.warning(
                "shutdown: %d request(s) still running after %.1fs ended with finish_reason 'abort'", len(left), timeout
            )
        self.core.shutdown()
        self._outq.put(None)
        self._out_thread.join(timeout=10)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self):
        try:
            self.shutdown()
        except Exception:
            pass


def _shutdown_at_exit(ref: weakref.ref[LLM]) -> None:
    llm = ref()
    if llm is not None:
        llm.shutdown()


__all__ = ["LLM", "EngineRequestError", "EngineOverloadedError", "EngineUnavailableError"]
