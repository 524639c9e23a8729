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
from dataclasses import asdict
from typing import Any

from nanovllmx.config import EngineConfig
from nanovllmx.engine.executor import Executor, StepHandle
from nanovllmx.engine.protocol import OutputSink
from nanovllmx.errors import EngineUnavailableError
from nanovllmx.scheduler.request import AbortRequest, EngineMessage, EngineOutput, EngineRequest
from nanovllmx.scheduler.scheduler import Scheduler
from nanovllmx.utils.timing import PhaseTimer

logger = logging.getLogger(__name__)


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
            lanes=cfg.pipeline_lanes,
            lanes_overlap=cfg.pipeline_overlap,
        )
        # requests and aborts in arrival order; None only wakes the loop (shutdown)
        self._inbox: queue.Queue[EngineMessage | None] = queue.Queue()
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
        self.executor.shutdown()

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
                try:
                    self.scheduler.add_request(item)
                except ValueError as e:
                    self.sink([EngineOutput.failed(item.request_id, str(e), len(item.prompt_token_ids))])
            elif isinstance(item, AbortRequest):
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
        batch = s.schedule() if len(self._inflight) < self.depth else None
        if batch is not None:
            tm.steps += 1
            tm.lap("schedule")
            self._inflight.append(self.executor.execute_async(batch))
            tm.lap("launch")
        outs: list[EngineOutput] = []
        if self._inflight and (batch is None or len(self._inflight) >= self.depth):
            r = self._inflight.popleft().result()  # results come back in step order
            outs = s.update(r.tokens, r.logprobs)
            tm.lap("wait_and_update")
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
