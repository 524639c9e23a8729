"""The engine core: the scheduler plus an executor, stepped by one background thread.

Clients (the offline LLM, the Ray scheduler actor) put requests and aborts in through thread-safe
methods and receive per-step EngineOutputs through a callback. The same class runs in-process or
inside the scheduler actor."""

from __future__ import annotations

import logging
import queue
import threading
import traceback
from collections.abc import Callable

from nanovllmx.config import EngineConfig
from nanovllmx.engine.executor import Executor
from nanovllmx.scheduler.request import EngineOutput, EngineRequest
from nanovllmx.scheduler.scheduler import Scheduler
from nanovllmx.utils.timing import PhaseTimer

logger = logging.getLogger(__name__)

OutputSink = Callable[[list[EngineOutput]], None]


class _Ready:
    """A result that is already here (executors without an async launch)."""

    def __init__(self, tokens):
        self.tokens = tokens

    def result(self):
        return self.tokens


class EngineCore:
    def __init__(self, cfg: EngineConfig, executor: Executor, sink: OutputSink):
        self.cfg, self.executor, self.sink = cfg, executor, sink
        num_slots = executor.available_kv_slots()
        executor.init_kv_cache(num_slots)
        self.scheduler = Scheduler(
            num_slots,
            cfg.max_bs,
            cfg.context_len,
            cfg.max_num_batched_tokens,
            cfg.eos_token_ids,
            cfg.enable_prefix_caching,
        )
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nanovllmx-engine", daemon=True)
        self.timer = PhaseTimer()  # schedule / launch / wait_and_update, per step
        self.overlap = bool(getattr(executor, "supports_overlap", False)) and cfg.overlap_scheduling
        self._inflight = None  # the launched step whose tokens are not applied yet
        self._thread.start()

    # ---- thread-safe client API ----
    def check_request(self, er: EngineRequest) -> None:
        """Raise ValueError now for a request the scheduler would refuse."""
        n = len(er.prompt_token_ids)
        if n == 0:
            raise ValueError("prompt is empty")
        if n >= self.cfg.context_len:
            raise ValueError(
                f"prompt has {n} tokens, but this model's context is {self.cfg.context_len} tokens "
                f"(prompt plus at least one generated token)"
            )
        vocab = self.cfg.hf_config.vocab_size
        if min(er.prompt_token_ids) < 0 or max(er.prompt_token_ids) >= vocab:  # C speed: runs per request
            raise ValueError(f"prompt token ids must be in [0, {vocab})")

    def add_request(self, er: EngineRequest) -> None:
        self.check_request(er)
        self._inbox.put(("add", er))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout=30)
        self.executor.shutdown()

    # ---- the loop ----
    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, arg = item
            if kind == "add":
                try:
                    self.scheduler.add_request(arg)
                except ValueError as e:
                    self.sink([EngineOutput(arg.request_id, [], "error", len(arg.prompt_token_ids), 0, str(e))])
            elif kind == "abort":
                self.scheduler.abort(arg)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def step(self) -> list[EngineOutput]:
        """Schedule and launch one step; return the outputs of the step before it (overlap: the
        CPU schedules step N+1 while the GPU runs step N) or of this one (no overlap)."""
        tm = self.timer
        tm.start()
        s = self.scheduler
        batch = s.schedule()
        handle = None
        if batch is not None:
            tm.steps += 1
            tm.lap("schedule")
            handle = self._launch(batch)
            tm.lap("launch")
        outs: list[EngineOutput] = []
        if self._inflight is not None:
            outs = s.update(self._inflight.result())
            tm.lap("wait_and_update")
        self._inflight = None
        if handle is not None:
            if self.overlap:
                self._inflight = handle
            else:
                outs += s.update(handle.result())
                tm.lap("wait_and_update")
        return outs + s.take_pending_outputs()

    def _launch(self, batch):
        if hasattr(self.executor, "execute_async"):
            return self.executor.execute_async(batch)
        return _Ready(self.executor.execute(batch))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.scheduler.has_work())
            if not self.scheduler.has_work():
                continue
            try:
                outs = self.step()
            except Exception as e:  # never die silently: fail what is in flight, keep serving
                logger.error("engine step failed; failing in-flight requests:\n%s", traceback.format_exc())
                self._inflight = None
                outs = self._fail_all(f"engine error: {type(e).__name__}: {e}")
            if outs:
                self.sink(outs)
                self.timer.lap("output_sink")

    def _fail_all(self, msg: str) -> list[EngineOutput]:
        s = self.scheduler
        outs = []
        for req in list(s.running) + list(s.waiting):
            s.abort(req.request_id)
            outs.append(EngineOutput(req.request_id, [], "error", req.num_prompt, req.num_cached, msg))
        s.take_pending_outputs()
        s.drop_inflight()
        return outs

    def stats(self) -> dict:
        from dataclasses import asdict

        d = asdict(self.scheduler.stats())
        d["step_ms"] = self.timer.summary()
        d["num_steps"] = self.timer.steps
        worker_timer = getattr(getattr(getattr(self.executor, "worker", None), "runner", None), "timer", None)
        if worker_timer is not None:
            d["worker_step_ms"] = worker_timer.summary()
        return d
