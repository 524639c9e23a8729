"""Worker actors (one per TP x PP shard) and the executor that drives them from the scheduler actor.

Setup (model load, process groups, KV sizing) goes through ordinary Ray calls. The step loop does
not: each worker runs its own loop thread that reads batches from a TCP connection to the
scheduler actor (nanovllmx/distributed/control.py), so a step costs one pickle, one socket write
per worker and one small result frame, not a Ray call per worker. `ray_step_mode="ray"` keeps a
Ray-call-per-step path for comparison and debugging.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import socket
import threading
import time
import traceback
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import ray
from numpy.typing import NDArray
from ray.actor import ActorHandle

from nanovllmx.config import EngineConfig
from nanovllmx.distributed import control
from nanovllmx.distributed.microbatch import split_batch
from nanovllmx.scheduler.messages import ScheduledBatch

if TYPE_CHECKING:
    from nanovllmx.engine.executor import StepHandle
    from nanovllmx.worker.worker import Worker

logger = logging.getLogger(__name__)


def _iface_for_ip(ip: str) -> str | None:
    """Network interface that carries `ip` (Linux), so gloo does not bind to a loopback address
    that the hostname happens to resolve to."""
    try:
        import fcntl
        import struct

        for _, name in socket.if_nameindex():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
                if socket.inet_ntoa(raw[20:24]) == ip:
                    return name
            except OSError:
                pass
            finally:
                s.close()
    except Exception:
        pass
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        port: int = s.getsockname()[1]
        return port


class WorkerActor:
    """A Ray actor around nanovllmx.worker.Worker; rank = pp_rank * tp_size + tp_rank."""

    def __init__(self, cfg: EngineConfig, rank: int, num_cpus: float):
        self.cfg, self.rank = cfg, rank
        self.node_ip = ray.util.get_node_ip_address()
        if cfg.device == "cpu":
            import torch

            torch.set_num_threads(max(1, int(num_cpus)))
            if "GLOO_SOCKET_IFNAME" not in os.environ:
                iface = _iface_for_ip(self.node_ip)
                if iface:
                    os.environ["GLOO_SOCKET_IFNAME"] = iface
        self.worker: Worker | None = None  # set by init_worker, the first call after the actor starts
        self._loop_thread: threading.Thread | None = None
        self._loop_error: str | None = None
        self._last_end: float | None = None

    # ---- setup, through Ray calls ----
    def node_info(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        tp = self.cfg.tp_size
        return dict(
            rank=self.rank,
            pp_rank=self.rank // tp,
            tp_rank=self.rank % tp,
            node_id=ctx.get_node_id(),
            ip=self.node_ip,
            pid=os.getpid(),
            gpu_ids=[str(g) for g in ray.get_gpu_ids()],
        )

    def rendezvous_address(self) -> str:
        """Called on rank 0 only: the torch.distributed init address (this node's IP, a free port)."""
        return f"tcp://{self.node_ip}:{_free_port()}"

    def init_worker(self, init_method: str | None) -> dict[str, Any]:
        from nanovllmx.worker.worker import Worker

        self.worker = Worker(self.cfg, self.rank, init_method, 0)  # Ray's CUDA_VISIBLE_DEVICES: our GPU is 0
        return self.node_info()

    def available_kv_slots(self) -> int:
        assert self.worker is not None
        return self.worker.available_kv_slots()

    def init_kv_cache(self, num_slots: int) -> None:
        assert self.worker is not None
        self.worker.init_kv_cache(num_slots)

    # ---- the step loop over the control socket ----
    def start_loop(self, address: tuple[str, int], result_rank: int, overlap: bool = False) -> None:
        conn = control.ControlClient(address, self.rank)  # ControlClient makes a list a tuple
        self._loop_thread = threading.Thread(
            target=self._loop,
            args=(conn, self.rank == result_rank, overlap),
            name=f"nanovllmx-worker-{self.rank}",
            daemon=True,
        )
        self._loop_thread.start()

    def _loop(self, conn: control.ControlClient, sends_result: bool, overlap: bool) -> None:
        """Read steps from the socket and run them. With `overlap` (pp_size == 1 and the engine sends
        steps ahead) a step is only launched here; its ids go back from a _ResultSender thread, so
        this thread reads and launches step N+1 while the device still runs step N."""
        if self.cfg.device == "cuda":
            import torch

            torch.cuda.set_device(0)  # the current device is per thread
        lock = threading.Lock()  # this thread (ERROR) and the sender thread share the socket
        sender = _ResultSender(self, conn, lock, threaded=overlap) if sends_result else None
        try:
            while True:
                kind, payload = conn.recv()
                if kind == control.STOP:
                    return
                if kind != control.STEP:
                    raise RuntimeError(f"unexpected control frame {kind}")
                batch = control.loads(payload)
                start = time.perf_counter()
                if not overlap:  # also every PP grid: micro-batch lists, only the last stage has ids
                    out = self._execute(batch)
                    if sender is not None:
                        sender.put(batch[0].step if isinstance(batch, list) else batch.step, out, start)
                    continue
                if sender is not None and not sender.reserve():
                    return  # the sender thread failed and has reported it
                assert self.worker is not None
                handle = self.worker.execute_async(batch)
                if sender is not None:
                    sender.put(batch.step, handle, start)
                # other TP ranks drop their handle: nobody reads their ids, and the TP collectives
                # keep them in step with the result rank
        except EOFError:
            logger.warning("rank %d: the scheduler closed the control connection; leaving the step loop", self.rank)
        except BaseException:
            self._report_error(conn, lock)
        finally:
            if sender is not None:
                sender.close(timeout=10.0)  # sends what is still in flight
            conn.close()

    def _report_error(self, conn: control.ControlClient, lock: threading.Lock) -> None:
        """Log the exception being handled and send it as an ERROR frame: the scheduler then fails
        the engine."""
        tb = traceback.format_exc()
        self._loop_error = self._loop_error or tb
        logger.error("rank %d: step failed:\n%s", self.rank, tb)
        try:
            with lock:
                conn.send(control.ERROR, f"rank {self.rank} on {self.node_ip}:\n{tb}".encode())
        except OSError:
            pass

    # ---- the step over Ray calls (ray_step_mode="ray") ----
    def _execute(self, batch: ScheduledBatch | list[ScheduledBatch]) -> NDArray[np.int32] | None:
        """One step: a batch, or its pipeline micro-batches in order (the last stage returns the
        concatenated sampled ids)."""
        worker = self.worker
        assert worker is not None
        if not isinstance(batch, list):
            return worker.execute(batch)
        outs = [worker.execute(b) for b in batch]
        return None if outs[0] is None else np.concatenate(cast("list[NDArray[np.int32]]", outs))

    def execute(self, payload: bytes) -> tuple[NDArray[np.int32], int, int] | None:
        batch = control.loads(payload)
        start = time.perf_counter()
        out = self._execute(batch)
        end = time.perf_counter()
        gap = -1 if self._last_end is None else int((start - self._last_end) * 1e9)
        self._last_end = end
        return None if out is None else (out, gap, int((end - start) * 1e9))

    def shutdown(self, timeout: float = 10.0) -> str | None:
        if self._loop_thread is not None:
            self._loop_thread.join(timeout)
        if self.worker is not None:
            self.worker.shutdown()  # destroys the process groups
            self.worker = None
        return self._loop_error


# steps launched whose ids have not been read yet, at most: ModelRunner double-buffers the pinned host
# copy of the sampled ids (_host_bufs), so step N+2's copy lands in step N's buffer
_HOST_BUFFERS = 2


class _ResultSender:
    """Sends the result rank's RESULT frames in step order: inline (`threaded=False`, the step already
    waited for its ids) or from its own thread, which waits for each launched step's ids and sends
    them as soon as they are there, whether or not another step follows.

    Timings (perf_counter): a step *starts* when its frame has been read and unpickled and *is
    ready* when its ids are on the host (the sender's `result()` returned).
      gap  = start(N) - ready(N-1), or 0 if step N started before step N-1 was ready (launched
             ahead: the device had step N queued). The time the device sat idle waiting for the
             control plane (scheduler, transport, unpickling) -- an upper bound: it excludes the
             part of step N's launch that runs before its first kernel.
      busy = ready(N) - max(start(N), ready(N-1)): step N's own time, not its wait behind N-1.
    gap + busy = ready(N) - ready(N-1), the step period; without overlap start(N) > ready(N-1)
    always, and they are the worker's end -> start and start -> end times."""

    def __init__(self, actor: WorkerActor, conn: control.ControlClient, lock: threading.Lock, threaded: bool):
        self.actor, self.conn, self.lock = actor, conn, lock
        self.last_ready: float | None = None
        self.failed = False
        self._thread: threading.Thread | None = None
        if threaded:
            self._q: queue.SimpleQueue[tuple[int, StepHandle, float] | None] = queue.SimpleQueue()
            # Step N+2 may launch only once step N's ids are read. The scheduler already guarantees
            # it (the engine core sends step N+2 after it has received step N's result, which we
            # send after reading it); the semaphore makes it hold here whatever the scheduler does,
            # and never waits while it does.
            self._slots = threading.Semaphore(_HOST_BUFFERS)
            self._thread = threading.Thread(target=self._run, name=f"nanovllmx-result-{actor.rank}", daemon=True)
            self._thread.start()

    def reserve(self) -> bool:
        """Wait until a step may launch (threaded); False if the sender thread has failed."""
        self._slots.acquire()
        return not self.failed

    def put(self, step: int, out: NDArray[np.int32] | StepHandle | None, start: float) -> None:
        """`out`: the ids (inline) or a launched step's handle (threaded, after `reserve()`); never None
        on the result rank (the last stage)."""
        if self._thread is None:
            self._send(step, cast("NDArray[np.int32]", out), start)
        else:
            self._q.put((step, cast("StepHandle", out), start))

    def _send(self, step: int, tokens: np.ndarray, start: float) -> None:
        ready, last = time.perf_counter(), self.last_ready
        self.last_ready = ready
        if last is None:  # the first step: no gap to measure
            gap, last = -1, start
        else:
            gap = int(max(0.0, start - last) * 1e9)
        busy = int((ready - max(start, last)) * 1e9)
        with self.lock:
            self.conn.send(control.RESULT, control.pack_result(step, tokens, gap, busy))

    def _run(self) -> None:
        try:
            while (item := self._q.get()) is not None:
                step, handle, start = item
                tokens = handle.result()  # waits on the step's CUDA event; a copy of the host buffer
                self._slots.release()  # the buffer is read: step N+2 may launch
                self._send(step, tokens, start)
        except BaseException:
            self.failed = True
            self.actor._report_error(self.conn, self.lock)
            self._slots.release(_HOST_BUFFERS)  # wake the loop thread if it waits in reserve()

    def close(self, timeout: float) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout)


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

    def result(self) -> np.ndarray:
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
        self._last_launch: float | None = None
        self._in_executor = 0.0  # seconds spent in launch/collect since the last launch
        self.overlap = bool(cfg.overlap_scheduling)  # the engine core sends steps ahead

    # ---- setup ----
    def available_kv_slots(self) -> int:
        slots: list[int] = ray.get([w.available_kv_slots.remote() for w in self.workers])
        return min(slots)

    def init_kv_cache(self, num_slots: int) -> None:
        ray.get([w.init_kv_cache.remote(num_slots) for w in self.workers])
        if self.mode == "socket":
            self.server = control.ControlServer(ray.util.get_node_ip_address())
            ray.get([w.start_loop.remote(self.server.address, self.result_rank, self.overlap) for w in self.workers])
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
        return _Launched(self, batch.step, refs, t0, sched)

    def _collect(self, h: _Launched) -> np.ndarray:
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
