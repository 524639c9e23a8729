"""The executor that drives the worker actors (worker_actor.py) from the scheduler actor: it
sends each step over the control sockets (or, with `ray_step_mode="ray"`, a Ray call per worker,
kept for comparison and debugging) and collects the sampled ids and the step timings.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import ray
from ray.actor import ActorHandle

from nanovllmx.config import EngineConfig
from nanovllmx.distributed import control
from nanovllmx.distributed.microbatch import split_batch
from nanovllmx.distributed.worker_actor import WorkerActor
from nanovllmx.engine.executor import StepHandle
from nanovllmx.scheduler.messages import ScheduledBatch, StepOutput

logger = logging.getLogger(__name__)


class _Launched:
    """A step sent to the workers; `result()` waits for its sampled ids (EngineCore's handle)."""

    __slots__ = ("executor", "step", "refs", "t_launch", "sched_s", "timed")

    def __init__(
        self,
        executor: RayExecutor,
        step: int,
        refs: list[ray.ObjectRef[Any]] | None,
        t_launch: float,
        sched_s: float | None,
    ):
        self.executor, self.step, self.refs, self.t_launch = executor, step, refs, t_launch
        self.sched_s = sched_s
        self.timed = sched_s is not None

    def result(self) -> StepOutput:
        return self.executor._collect(self)


class RayExecutor:
    """Executor (see nanovllmx/engine/executor.py) over worker actors; lives in the scheduler actor.

    `execute_async` sends a step and returns at once; with pp_size == 1 the engine may send step
    N+1 before it has step N's tokens (overlap scheduling): every rank is a last-stage rank that
    sampled step N itself, so each resolves the scheduler's -1 placeholders from its own buffer,
    and a worker finds step N+1 waiting on its socket when it finishes step N."""

    def __init__(
        self, cfg: EngineConfig, workers: list[ActorHandle[WorkerActor]], mode: str = "socket", window: int = 2048
    ):
        if mode not in ("socket", "ray"):
            raise ValueError(f"ray_step_mode must be 'socket' or 'ray', got {mode!r}")
        self.cfg, self.workers, self.mode = cfg, workers, mode
        # tp_rank 0 of the last stage returns the sampled ids
        self.result_rank = (cfg.pp_size - 1) * cfg.tp_size
        m = cfg.pp_microbatches if cfg.pp_microbatches is not None else cfg.pp_size
        if not isinstance(m, int) or m < 1:
            raise ValueError(f"pp_microbatches must be a positive integer, got {m!r}")
        self.microbatches = m if cfg.pp_size > 1 else 1
        # a micro-batch must be big enough to be compute bound, or splitting only adds launches (GPU) or
        # leaves the last stage's LM head alone on the critical path (CPU, measured)
        self.min_microbatch_tokens = max(1, int(cfg.pp_microbatch_min_tokens))
        self.server: control.ControlServer | None = None
        self._broken: str | None = None
        # step timings (seconds), over the last `window` steps that followed another step directly
        # worker (result rank), see _ResultSender: without overlap, end of step N -> start of step N+1 and
        # start -> end of its execute; with overlap, device idle between steps and step N's own time
        self._gap: collections.deque[float] = collections.deque(maxlen=window)
        self._busy: collections.deque[float] = collections.deque(maxlen=window)
        self._sched: collections.deque[float] = collections.deque(
            maxlen=window
        )  # scheduler: its own work between two launches
        self._wall: collections.deque[float] = collections.deque(maxlen=window)  # scheduler: launch -> sampled ids back
        self._idle = True
        self._outstanding = 0  # steps launched and not collected
        self.max_inflight = 0  # the most steps in flight at once so far (pipelining at work: > 1)
        self._last_launch: float | None = None
        self._in_executor = 0.0  # seconds spent in launch/collect since the last launch
        self.overlap = bool(cfg.overlap_scheduling)  # steps sent before the previous one's ids (placeholders)
        self.lanes = cfg.pipeline_lanes  # pipeline: disjoint batches in flight
        # the workers launch a step and read the next frame while it runs whenever the engine core
        # sends steps ahead (overlap scheduling or a pipeline's lanes)
        self.worker_overlap = self.overlap or self.lanes > 1

    # ---- setup ----
    def available_kv_slots(self) -> int:
        slots: list[int] = ray.get([w.available_kv_slots.remote() for w in self.workers])
        return min(slots)

    def init_kv_cache(self, num_slots: int) -> None:
        ray.get([w.init_kv_cache.remote(num_slots) for w in self.workers])
        if self.mode == "socket":
            self.server = control.ControlServer(ray.util.get_node_ip_address())
            ray.get(
                [w.start_loop.remote(self.server.address, self.result_rank, self.worker_overlap) for w in self.workers]
            )
            self.server.accept(len(self.workers), timeout=120)

    def mark_idle(self) -> None:
        """The engine waited for requests: the next gap measures idleness, not the control plane."""
        self._idle = True

    @property
    def broken(self) -> str | None:
        return self._broken

    # ---- one step ----
    def _check(self) -> None:
        if self._broken:
            raise RuntimeError(f"the distributed engine is broken: {self._broken}")

    def execute_async(self, batch: ScheduledBatch) -> _Launched:
        self._check()
        t0 = time.perf_counter()
        sched = None
        if not self._idle and self._last_launch is not None:
            sched = max(0.0, (t0 - self._last_launch) - self._in_executor)
        self._idle = False
        self._last_launch, self._in_executor = t0, 0.0
        refs = None
        try:
            m = min(self.microbatches, batch.num_tokens // self.min_microbatch_tokens)
            msg = split_batch(batch, m) if m > 1 else batch
            if self.mode == "socket":
                assert self.server is not None  # started by init_kv_cache
                self.server.broadcast(control.STEP, control.dumps(msg))
            else:
                ref = ray.put(control.dumps(msg))  # bytes: the worker's arrays stay writable
                refs = [w.execute.remote(ref) for w in self.workers]
        except Exception as e:
            self._fail(e)
            raise
        self._in_executor += time.perf_counter() - t0
        self._outstanding += 1
        self.max_inflight = max(self.max_inflight, self._outstanding)
        return _Launched(self, batch.step, refs, t0, sched)

    @property
    def defers_grammar(self) -> bool:
        # over the sockets a GRAMMAR frame follows its step (1-stage grids: the engine keeps one step
        # in flight before it); a Ray call per worker cannot, nor can pipeline lanes wait for it
        return self.mode == "socket" and self.cfg.pp_size == 1

    def apply_grammar(self, handle: StepHandle, step: int, bitmask: np.ndarray) -> None:
        self._check()
        assert self.server is not None  # socket mode (defers_grammar)
        try:
            self.server.broadcast(control.GRAMMAR, control.pack_grammar(step, bitmask))
        except Exception as e:
            self._fail(e)
            raise

    def _collect(self, h: _Launched) -> StepOutput:
        self._check()
        t0 = time.perf_counter()
        try:
            if self.mode == "socket":
                assert self.server is not None  # started by init_kv_cache
                while True:  # results come in step order; skip those of steps the engine dropped
                    step, tokens, gap_ns, busy_ns = control.unpack_result(self.server.wait_result(self.result_rank))
                    if step >= h.step:
                        break
                if step != h.step:
                    raise control.ControlError(f"expected the result of step {h.step}, got step {step}")
            else:
                assert h.refs is not None  # ray mode: one call per worker
                tokens, gap_ns, busy_ns = ray.get(h.refs)[self.result_rank]
        except Exception as e:
            self._fail(e)
            raise
        t1 = time.perf_counter()
        self._outstanding -= 1
        self._in_executor += t1 - t0
        if h.sched_s is not None and gap_ns >= 0:  # h.timed
            self._gap.append(gap_ns * 1e-9)
            self._busy.append(busy_ns * 1e-9)
            self._sched.append(h.sched_s)
            self._wall.append(t1 - h.t_launch)
        return tokens

    def _fail(self, e: Exception) -> None:
        self._broken = str(e) if isinstance(e, control.ControlError) else f"{type(e).__name__}: {e}"

    def metrics(self) -> dict[str, Any]:
        def ms(d: Iterable[float]) -> float | None:
            d = tuple(d)  # a snapshot: the engine thread appends concurrently
            return round(1e3 * sum(d) / len(d), 4) if d else None

        gap, busy, sched = ms(self._gap), ms(self._busy), ms(self._sched)
        return dict(
            step_mode=self.mode,
            overlap=self.overlap,  # steps are sent before the previous one's tokens are back
            pp_microbatches=self.microbatches,
            pipeline_lanes=self.lanes,  # batches of disjoint requests in flight (pp > 1)
            max_inflight_steps=self.max_inflight,
            num_timed_steps=len(self._gap),
            # the measure: time between a worker finishing step N and starting step N+1 (with
            # overlap: between step N's ids being ready and step N+1 starting, 0 when it was launched
            # ahead -- the device's wait for the control plane; see _ResultSender)
            control_plane_ms_per_step=gap,
            # the scheduler's own work per step (update, request intake, schedule); without overlap it
            # is part of the gap, with overlap it runs while the workers compute
            scheduler_ms_per_step=sched,
            transport_ms_per_step=(
                None if gap is None or sched is None or self.overlap else round(max(gap - sched, 0.0), 4)
            ),
            worker_busy_ms_per_step=busy,  # gap + busy: the worker's step period
            step_wall_ms=ms(self._wall),
            control_plane_share=None
            if gap is None or busy is None or gap + busy == 0
            else round(gap / (gap + busy), 4),
        )

    def shutdown(self) -> None:
        if self.server is not None:
            try:
                self.server.broadcast(control.STOP)
            except Exception:
                pass
        errors = []
        try:
            refs = [w.shutdown.remote() for w in self.workers]
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=20)
            for r in done:
                try:
                    e = ray.get(r)
                    if e:
                        errors.append(e)
                except Exception as e:  # a dead worker
                    errors.append(repr(e))
        finally:
            if self.server is not None:
                self.server.close()
        if errors:
            logger.warning("worker errors seen during the run:\n%s", "\n".join(errors))


def stage_metrics(workers: list[ActorHandle[WorkerActor]], tp_size: int, pp_size: int) -> dict[str, Any]:
    """Each pipeline stage's device busy share and busy ms per step (its tp_rank 0), and whether the
    TP all-reduces of small messages go one-shot, read from the workers (Ray calls: the client
    asks, so the scheduler actor's step loop never waits on them); empty when they do not answer."""
    try:
        rows = ray.get([workers[s * tp_size].stage_stats.remote() for s in range(pp_size)], timeout=10)
    except Exception as e:  # never fail stats() over it (a dead worker: health reports it)
        logger.warning("stage stats unavailable: %s", e)
        return {}
    return dict(
        stage_busy_share=[r["busy_share"] for r in rows],
        stage_busy_ms_per_step=[r["busy_ms_per_step"] for r in rows],
        tp_one_shot_allreduce=all(r["one_shot_allreduce"] for r in rows),
    )
