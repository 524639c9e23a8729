"""The engine core: the scheduler plus an executor, stepped by one background thread.

Clients (the offline LLM, the Ray scheduler actor) send requests and aborts in through thread-safe
methods and receive per-step EngineOutputs through a callback. The same class runs in-process or
inside the scheduler actor; it implements `CoreClient` (engine/protocol.py)."""

from __future__ import annotations

import logging
import queue
import threading
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from nanovllmx.config import EngineConfig
from nanovllmx.engine.executor import Executor, StepHandle
from nanovllmx.engine.protocol import OutputSink
from nanovllmx.errors import EngineUnavailableError
from nanovllmx.scheduler.request import AbortRequest, EngineMessage, EngineOutput, EngineRequest
from nanovllmx.scheduler.scheduler import Scheduler
from nanovllmx.structured.grammar import GrammarCompiler, get_compiler
from nanovllmx.structured.spec import GrammarSpec
from nanovllmx.utils.timing import PhaseTimer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Compiled:
    """A constrained request back from the compile thread: its grammar is in the cache now."""

    request: EngineRequest


def _compiler_exists(cfg: EngineConfig) -> bool:
    from nanovllmx.structured.grammar import compiler_exists

    return compiler_exists(cfg.model, cfg.vocab_size, cfg.eos_token_ids)


class EngineCore:
    def __init__(self, cfg: EngineConfig, executor: Executor, sink: OutputSink):
        self.cfg, self.executor, self.sink = cfg, executor, sink
        num_slots = executor.available_kv_slots()
        executor.init_kv_cache(num_slots)
        self.scheduler = Scheduler(
            num_slots,
            cfg.max_bs,
            cfg.max_len,
            cfg.max_num_batched_tokens,
            cfg.eos_token_ids,
            cfg.enable_prefix_caching,
            cfg.vocab_size,
            grammar_compiler=self._grammar_compiler,
            lanes=cfg.pipeline_lanes,
            lanes_overlap=cfg.pipeline_overlap,
        )
        # requests and aborts in arrival order (a constrained request whose grammar is not compiled
        # yet comes back as _Compiled once it is); None only wakes the loop (shutdown)
        self._inbox: queue.Queue[EngineMessage | _Compiled | None] = queue.Queue()
        self._compiling: set[str] = set()  # ids of requests whose grammar compiles off the loop
        self._compile_pool: ThreadPoolExecutor | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nanovllmx-engine", daemon=True)
        self.timer = PhaseTimer()  # schedule / launch / wait_and_update, per step
        self.overlap = bool(cfg.overlap_scheduling)
        # most steps launched and not yet applied: a pipeline's lanes (disjoint batches, pp > 1), one
        # more with overlap; else two with overlap scheduling (step N+1 launched before step N's
        # tokens), else one
        lanes = cfg.pipeline_lanes
        self.depth = lanes + int(self.overlap) if lanes > 1 else (2 if self.overlap else 1)
        self._inflight: deque[StepHandle] = deque()  # launched steps whose tokens are not applied yet, oldest first
        self._thread.start()

    # ---- thread-safe client API (CoreClient) ----
    def add_request(self, request: EngineRequest) -> None:
        """Queue a request. A prompt the scheduler refuses ends as an "error" output (the LLM
        client checks prompts before submitting, so a caller sees that as a ValueError at once)."""
        self._inbox.put(request)

    def abort(self, request_id: str) -> None:
        self._inbox.put(AbortRequest(request_id))

    def check_health(self) -> None:
        if self._stop.is_set():
            raise EngineUnavailableError("the engine has been shut down")
        if not self._thread.is_alive():
            raise EngineUnavailableError("the engine's step loop has stopped")
        if self.executor.broken:
            raise EngineUnavailableError(f"the engine's workers are broken: {self.executor.broken}")

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout=30)
        if self._compile_pool is not None:
            self._compile_pool.shutdown(wait=False, cancel_futures=True)
        self.executor.shutdown()

    # ---- grammars: compiled off the step loop ----
    def _grammar_compiler(self) -> GrammarCompiler:
        c = self.cfg
        return get_compiler(c.model, c.vocab_size, c.eos_token_ids)

    def _admit(self, req: EngineRequest, compiled: bool = False) -> None:
        """Into the scheduler; a refused request ends as an "error" output. A grammar not in the cache
        is compiled first, in a thread (`compiled`: it was, or it failed and the scheduler says why)."""
        spec = req.params.structured
        if spec is not None and not compiled and not self._grammar_compiler_ready(spec):
            # a new grammar (and the first one: the tokenizer's tables, ~1.6 s) compiles in a thread,
            # not in the loop that streams every running request's tokens
            if self._compile_pool is None:
                self._compile_pool = ThreadPoolExecutor(1, thread_name_prefix="nanovllmx-grammar")
            self._compiling.add(req.request_id)
            self._compile_pool.submit(self._compile, req)
            return
        try:
            self.scheduler.add_request(req)
        except ValueError as e:
            self.sink([EngineOutput.failed(req.request_id, str(e), len(req.prompt_token_ids))])

    def _grammar_compiler_ready(self, spec: GrammarSpec) -> bool:
        return _compiler_exists(self.cfg) and self._grammar_compiler().is_cached(spec)

    def _compile(self, req: EngineRequest) -> None:
        assert req.params.structured is not None
        try:
            self._grammar_compiler().compile(req.params.structured)
        except Exception:  # noqa: BLE001 - the scheduler compiles it again and fails the request alone
            pass
        self._inbox.put(_Compiled(req))

    # ---- the loop ----
    def _drain(self, block: bool) -> None:
        if block:
            self.executor.mark_idle()
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(item, EngineRequest):
                self._admit(item)
            elif isinstance(item, _Compiled):
                if item.request.request_id in self._compiling:  # else aborted while compiling
                    self._compiling.discard(item.request.request_id)
                    self._admit(item.request, compiled=True)
            elif isinstance(item, AbortRequest):
                if item.request_id in self._compiling:  # not in the scheduler yet: its final output is ours
                    self._compiling.discard(item.request_id)
                    self.sink([EngineOutput(item.request_id, [], "abort")])
                self.scheduler.abort(item.request_id)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def step(self) -> list[EngineOutput]:
        """Schedule and launch one step, then apply the oldest launched step's tokens once `depth`
        steps are in flight (or nothing new could be scheduled). Overlap: the CPU schedules step
        N+1 while the GPU runs step N; lanes (pp > 1): stage 0 runs step N+1 while stage 1 runs N."""
        tm = self.timer
        tm.start()
        s = self.scheduler
        outs: list[EngineOutput] = []
        if self._inflight and not self.executor.defers_grammar and s.grammar_waits_on_inflight():
            # this executor cannot take masks after a step (the Ray calls transport, pipeline grids):
            # apply the steps in flight first, so the masks are known when the batch is built
            while self._inflight:
                r = self._inflight.popleft().result()
                outs += s.update(r.tokens, r.logprobs)
        batch = s.schedule() if len(self._inflight) < self.depth else None
        handle = None
        if batch is not None:
            tm.steps += 1
            tm.lap("schedule")
            handle = self.executor.execute_async(batch)
            self._inflight.append(handle)
            tm.lap("launch")
        if self._inflight and (batch is None or len(self._inflight) >= self.depth):
            r = self._inflight.popleft().result()  # results come back in step order
            outs += s.update(r.tokens, r.logprobs)
            tm.lap("wait_and_update")
        if handle is not None and batch is not None and batch.mask_deferred:
            # the constrained rows' previous tokens are applied now (one step in flight before this
            # one: in-process or a 1-stage grid): their masks, while the device runs this step
            while not s.deferred_masks_ready(batch.step) and len(self._inflight) > 1:
                r = self._inflight.popleft().result()
                outs += s.update(r.tokens, r.logprobs)
            self.executor.apply_grammar(handle, batch.step, s.fill_deferred_masks(batch.step))
            tm.lap("grammar_masks")
        return outs + s.take_pending_outputs()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.scheduler.has_work())
            if not self.scheduler.has_work():
                continue
            try:
                outs = self.step()
            except Exception as e:  # never die silently: fail what is in flight, keep serving
                logger.error("engine step failed; failing in-flight requests:\n%s", traceback.format_exc())
                self._inflight.clear()
                outs = self._fail_all(f"engine error: {type(e).__name__}: {e}")
            if outs:
                self.sink(outs)
                self.timer.lap("output_sink")

    def _fail_all(self, msg: str) -> list[EngineOutput]:
        s = self.scheduler
        outs = []
        for req in list(s.running) + list(s.waiting):
            s.abort(req.request_id)
            outs.append(EngineOutput.failed(req.request_id, msg, req.num_prompt, req.num_cached))
        s.take_pending_outputs()
        s.drop_inflight()
        return outs

    def prefix_summary(self, limit: int) -> list[int]:
        """The radix tree's newest `limit` prefix block hashes (RadixCache.prefix_summary)."""
        return self.scheduler.tree.prefix_summary(limit)

    def stats(self) -> dict[str, Any]:
        d: dict[str, Any] = asdict(self.scheduler.stats())
        d["step_ms"] = self.timer.summary()
        d["num_steps"] = self.timer.steps
        d.update(self.executor.metrics())
        return d
