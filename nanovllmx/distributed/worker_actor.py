"""Worker actors: one per TP x PP shard, each holding a `Worker` (model shard, KV pool, sampler).

Setup (model load, process groups, KV sizing) goes through ordinary Ray calls. The step loop does
not: each worker runs its own loop thread that reads batches from a TCP connection to the
scheduler actor (nanovllmx/distributed/control.py), so a step costs one pickle, one socket write
per worker and one small result frame, not a Ray call per worker. The executor that drives them
is `RayExecutor` (ray_executor.py).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, cast

import ray

from nanovllmx.config import EngineConfig
from nanovllmx.distributed import control
from nanovllmx.distributed.microbatch import merge_outputs
from nanovllmx.scheduler.messages import ScheduledBatch, StepOutput
from nanovllmx.utils.log import setup_logging

if TYPE_CHECKING:
    from nanovllmx.engine.executor import StepHandle
    from nanovllmx.worker.model_runner import DeferredTokens
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

    def __init__(self, cfg: EngineConfig, rank: int, num_cpus: float, log_level: int = logging.WARNING):
        setup_logging(log_level)  # the level of the process that started the engine (RayEngine passes it)
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
        self.local_device = 0  # this shard's CUDA device index (Ray shows only its GPU, as 0)
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

    def init_worker(self, init_method: str | None, visible_gpus: list[str] | None = None) -> dict[str, Any]:
        """Load this shard. `visible_gpus`: the grid's GPUs on this node (placement.node_visible_gpus),
        made visible before CUDA starts, so that the TP ranks can map each other's memory; without
        it only Ray's own GPU is visible, as device 0."""
        from nanovllmx.worker.worker import Worker

        if visible_gpus:
            own = [str(g) for g in ray.get_gpu_ids()]
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible_gpus)
            self.local_device = visible_gpus.index(own[0])
        self.worker = Worker(self.cfg, self.rank, init_method, self.local_device)
        return self.node_info()

    def stage_stats(self) -> dict[str, Any]:
        """This worker's device busy time per step and busy share (worker/busy_meter.py)."""
        assert self.worker is not None
        if self.cfg.device == "cuda":
            import torch

            torch.cuda.set_device(self.local_device)
        return {"rank": self.rank, "one_shot_allreduce": self.worker.one_shot_allreduce, **self.worker.busy.summary()}

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
        """Read steps from the socket and run them. With `overlap` (the engine sends steps ahead:
        overlap scheduling, or a pipeline's batches in flight) a step is only launched here; its ids
        go back from a _ResultSender thread, so this thread reads and launches step N+1 while the
        device still runs step N."""
        if self.cfg.device == "cuda":
            import torch

            torch.cuda.set_device(self.local_device)  # the current device is per thread
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
                if not overlap:
                    out = self._execute(batch)
                    if sender is not None:
                        sender.put(batch[0].step if isinstance(batch, list) else batch.step, out, start)
                    continue
                if sender is not None and not sender.reserve():
                    return  # the sender thread failed and has reported it
                handle = self._launch(batch)
                if not isinstance(batch, list) and batch.mask_deferred:
                    # its grammar masks follow it (the device runs the forward meanwhile); only
                    # 1-stage grids defer them (RayExecutor.defers_grammar), so this rank samples
                    kind, payload = conn.recv()
                    if kind != control.GRAMMAR:
                        raise RuntimeError(f"expected the grammar masks of step {batch.step}, got frame {kind}")
                    step, bitmask = control.unpack_grammar(payload)
                    if step != batch.step:
                        raise RuntimeError(f"expected the grammar masks of step {batch.step}, got step {step}'s")
                    assert handle is not None
                    cast("DeferredTokens", handle).apply_grammar(bitmask)
                if sender is not None:
                    assert handle is not None  # the result rank is on the last stage
                    sender.put(batch[0].step if isinstance(batch, list) else batch.step, handle, start)
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

    def _launch(self, batch: ScheduledBatch | list[ScheduledBatch]) -> StepHandle | None:
        """Launch a step, a batch or its pipeline micro-batches in order: the last stage's handle
        (ids of the micro-batches concatenated), None on other stages."""
        worker = self.worker
        assert worker is not None
        if not isinstance(batch, list):
            return cast("StepHandle | None", worker.execute_async(batch))
        handles = [worker.execute_async(b) for b in batch]
        return None if handles[0] is None else _Concat(cast("list[StepHandle]", handles))

    # ---- the step over Ray calls (ray_step_mode="ray") ----
    def _execute(self, batch: ScheduledBatch | list[ScheduledBatch]) -> StepOutput | None:
        """One step: a batch, or its pipeline micro-batches in order (the last stage returns the
        merged sampled ids and logprobs)."""
        worker = self.worker
        assert worker is not None
        if not isinstance(batch, list):
            return worker.execute(batch)
        outs = [worker.execute(b) for b in batch]
        return None if outs[0] is None else merge_outputs(cast("list[StepOutput]", outs))

    def execute(self, payload: bytes) -> tuple[StepOutput, int, int] | None:
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


class _Concat:
    """The handle of a step run as pipeline micro-batches: their outputs, merged in order."""

    def __init__(self, handles: list[StepHandle]):
        self.handles = handles

    def result(self) -> StepOutput:
        return merge_outputs([h.result() for h in self.handles])


# steps launched whose ids have not been read yet, at most: ModelRunner keeps two pinned host buffers
# per micro-batch for the sampled ids (_host_bufs), so step N+2's copy lands in step N's buffers
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

    def put(self, step: int, out: StepOutput | StepHandle | None, start: float) -> None:
        """`out`: the step's output (inline) or a launched step's handle (threaded, after
        `reserve()`); never None on the result rank (the last stage)."""
        if self._thread is None:
            self._send(step, cast("StepOutput", out), start)
        else:
            self._q.put((step, cast("StepHandle", out), start))

    def _send(self, step: int, tokens: StepOutput, start: float) -> None:
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
