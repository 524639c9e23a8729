"""The engine on Ray: a scheduler actor that owns an EngineCore (scheduler, radix cache, continuous
batch) driving one worker actor per TP x PP shard, and `RayCoreClient`, the caller-side object
the LLM uses in place of an in-process EngineCore (both implement `CoreClient`, engine/protocol.py;
outputs are delivered through the sink callback).

    caller process                    scheduler actor (bundle 0's node)      worker actors
    RayCoreClient    --submit(seq)--> EngineCore thread --socket: batch--> loop thread x (tp*pp)
      poll thread   <--get_outputs--  outputs buffer    <--socket: ids---  (last stage, tp_rank 0)

Requests and aborts are fire-and-forget Ray calls carrying a sequence number (the actor applies
them in order even if Ray delivers them out of order); outputs come back by long polling. The actor
serves several clients (the RayCoreClient that started it, and others attached to it with
`attach_to`: Serve's HTTP frontends), each with its own sequence and outputs, routed by request id.
See docs/distributed.md.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray

from nanovllmx.config import EngineConfig
from nanovllmx.engine.core import EngineCore
from nanovllmx.engine.protocol import OutputSink
from nanovllmx.errors import EngineUnavailableError
from nanovllmx.scheduler.request import AbortRequest, EngineMessage, EngineOutput, EngineRequest

if TYPE_CHECKING:
    from ray.actor import ActorHandle
    from ray.util.placement_group import PlacementGroup

    from nanovllmx.distributed.worker_actor import WorkerActor

logger = logging.getLogger(__name__)


CLIENT_TIMEOUT_S = 60.0  # a client that has not polled for this long is gone: its requests are aborted
# clients polling at once (the actor's poll threads; one more polls, but waits for a thread): the
# engine's owner and up to 15 frontends (build_app's `frontends` is bounded by it)
MAX_CLIENTS = 16
_REAP_EVERY_S = 1.0


@dataclass
class _Client:
    """One caller of the scheduler actor: its message order and its undelivered outputs."""

    cond: threading.Condition  # on the actor's lock: wakes this client's long poll
    next_seq: int = 0
    early: dict[int, EngineMessage] = field(default_factory=dict)  # arrived ahead of their turn
    outputs: list[EngineOutput] = field(default_factory=list)
    unfinished: set[str] = field(default_factory=set)
    last_poll: float = field(default_factory=time.monotonic)
    num_requests: int = 0  # submitted since registration (stats)


class SchedulerActor:
    """Owns the EngineCore and serves one or more clients (`RayCoreClient`s: the one that started the
    engine, and any attached to it, e.g. several HTTP frontends). Each client has its own message
    order and gets only its own requests' outputs (routed by request id). Methods in the default
    concurrency group run one at a time in submission order; `get_outputs` has its own group so a
    long poll never blocks a submit."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.core: EngineCore | None = None
        self._lock = threading.Lock()
        self._clients: dict[int, _Client] = {}
        self._owner: dict[str, int] = {}  # unfinished request id -> its client
        self._client_ids = itertools.count()
        self._closed = False
        self._last_reap = time.monotonic()

    def start(self, workers: list[Any]) -> int:
        from nanovllmx.distributed.ray_executor import RayExecutor

        executor = RayExecutor(self.cfg, workers, mode=self.cfg.ray_step_mode)
        self.core = EngineCore(self.cfg, executor, self._sink)
        return self.core.scheduler.num_slots

    def _core(self) -> EngineCore:
        if self.core is None:
            raise EngineUnavailableError("the engine has not started")
        return self.core

    # ---- clients ----
    def register_client(self) -> int:
        with self._lock:
            if self._closed:
                raise EngineUnavailableError("the engine has been shut down")
            cid = next(self._client_ids)
            self._clients[cid] = _Client(threading.Condition(self._lock))
            return cid

    def unregister_client(self, client: int) -> None:
        """Forget a client; its unfinished requests are aborted."""
        with self._lock:
            self._drop(client)

    def _drop(self, client: int) -> None:
        """Under the lock: abort a client's unfinished requests and forget it (their final outputs,
        with no client to go to, are discarded)."""
        c = self._clients.pop(client, None)
        if c is None:
            return
        for rid in c.unfinished:
            self._core().abort(rid)
        c.cond.notify_all()

    def _reap(self, now: float) -> None:
        """Under the lock, at most once a second: drop clients that stopped polling (a crashed caller),
        so their requests stop running and their outputs stop piling up."""
        if now - self._last_reap < _REAP_EVERY_S:
            return
        self._last_reap = now
        for cid in [cid for cid, c in self._clients.items() if now - c.last_poll > CLIENT_TIMEOUT_S]:
            logger.warning(
                "client %d has not polled for %.0fs: dropping it and aborting its requests",
                cid,
                now - self._clients[cid].last_poll,
            )
            self._drop(cid)

    def _sink(self, outs: list[EngineOutput]) -> None:
        """The core's outputs, each to its request's client (a final output ends the routing). In the
        engine's step loop: ~0.1 us per output."""
        owner, clients = self._owner, self._clients
        with self._lock:
            for o in outs:
                rid = o.request_id
                if o.finish_reason is None:
                    c = clients.get(owner.get(rid, -1))
                else:
                    c = clients.get(owner.pop(rid, -1))
                    if c is not None:
                        c.unfinished.discard(rid)
                if c is not None:  # else its client is gone
                    c.outputs.append(o)
            for c in clients.values():
                if c.outputs:
                    c.cond.notify_all()
            self._reap(time.monotonic())

    # ---- requests in ----
    def submit(self, client: int, seq: int, msg: EngineMessage) -> None:
        """Apply the client's message `seq` once all its earlier ones are applied."""
        core = self._core()
        with self._lock:
            c = self._clients.get(client)
            if c is None:  # dropped: its poll will say so; a request must not run for nobody
                if isinstance(msg, EngineRequest):
                    logger.warning("request %s from unknown client %d ignored", msg.request_id, client)
                return
            c.early[seq] = msg
            while c.next_seq in c.early:
                msg = c.early.pop(c.next_seq)
                c.next_seq += 1
                if isinstance(msg, EngineRequest):
                    self._add(client, c, core, msg)
                elif self._owner.get(msg.request_id) == client:  # never another client's request
                    core.abort(msg.request_id)

    def _add(self, client: int, c: _Client, core: EngineCore, req: EngineRequest) -> None:
        rid = req.request_id
        other = self._owner.get(rid)
        if other is not None and other != client:  # a clash: refuse it, never mix the two up
            c.outputs.append(EngineOutput.failed(rid, f"request id {rid!r} is in use by another client of this engine"))
            c.cond.notify_all()
            return
        self._owner[rid] = client
        c.unfinished.add(rid)
        c.num_requests += 1
        core.add_request(req)

    # ---- outputs out ----
    @ray.method(concurrency_group="poll")
    def get_outputs(self, client: int, timeout: float) -> list[EngineOutput] | None:
        """The client's outputs since its last call, waiting up to `timeout` s for some; None once
        shut down. Raises EngineUnavailableError for a client that is not registered (any more)."""
        with self._lock:
            c = self._clients.get(client)
            if c is None:
                raise EngineUnavailableError(self._gone(client))
            c.last_poll = time.monotonic()
            if not c.outputs and not self._closed:
                c.cond.wait(timeout)
            if self._clients.get(client) is not c:
                raise EngineUnavailableError(self._gone(client))
            c.last_poll = now = time.monotonic()
            self._reap(now)
            if self._closed and not c.outputs:
                return None
            outs, c.outputs = c.outputs, []
            return outs

    @staticmethod
    def _gone(client: int) -> str:
        return (
            f"client {client} of the engine is not registered: unregistered, or dropped after "
            f"{CLIENT_TIMEOUT_S:.0f}s without polling"
        )

    def stats(self) -> dict[str, Any]:
        d = self._core().stats()
        with self._lock:  # per client: requests submitted, and those not finished yet
            d["clients"] = {
                str(cid): {"num_requests": c.num_requests, "num_unfinished": len(c.unfinished)}
                for cid, c in self._clients.items()
            }
        return d

    def prefix_summary(self, limit: int) -> list[int]:
        return self._core().prefix_summary(limit)

    def shutdown(self) -> None:
        try:
            if self.core is not None:
                self.core.shutdown()
        finally:
            with self._lock:
                self._closed = True
                for c in self._clients.values():
                    c.cond.notify_all()

    def ping(self) -> bool:
        return True

    def health(self) -> str | None:
        """Why this engine cannot serve, or None (a string: the caller raises it as its own error)."""
        try:
            self._core().check_health()
        except EngineUnavailableError as e:
            return str(e)
        return None


def _wait_all(refs: list[ray.ObjectRef[Any]], what: str, timeout: float | None = None) -> list[Any]:
    """ray.get a list, raising as soon as any of them fails (the others may be blocked waiting on
    the failed one, e.g. in a rendezvous)."""
    pending = list(refs)
    deadline = None if timeout is None else time.monotonic() + timeout
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not done:
            raise TimeoutError(f"{what}: {len(pending)} of {len(refs)} did not finish within {timeout}s")
        ray.get(done[0])  # raises the failure
    return ray.get(refs)


@dataclass(frozen=True)
class EngineAttachment:
    """What another process needs to use a running engine (`LLM(attach_to=...)`): the handles of its
    scheduler and worker actors (picklable: it travels through Ray calls)."""

    scheduler: Any  # ActorHandle[SchedulerActor]
    workers: list[Any]  # ActorHandle[WorkerActor], rank order
    worker_info: list[dict[str, Any]]


class RayCoreClient:
    """Caller-side stand-in for EngineCore when the engine runs on Ray (a `CoreClient`). It starts
    the engine (placement group, worker actors, scheduler actor) and stops it at shutdown, or, given
    `attach_to`, joins an engine another process started: then it only registers as one more client
    of the scheduler actor, and its shutdown only unregisters (the engine stays up)."""

    POLL_S = 0.5

    def __init__(self, cfg: EngineConfig, sink: OutputSink, attach_to: EngineAttachment | None = None):
        self.cfg, self.sink = cfg, sink
        self.owns_engine = attach_to is None
        self.pg: PlacementGroup | None = None
        self.owns_pg = cfg.placement_bundle_offset is None and self.owns_engine  # else Serve's, or none
        self.workers: list[ActorHandle[WorkerActor]] = []
        self.scheduler: ActorHandle[SchedulerActor] | None = None
        self.worker_info: list[dict[str, Any]] = []
        self.client_id = -1
        self._seq = itertools.count()
        self._inflight: set[str] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._dead: str | None = None  # why the scheduler actor is gone (then nothing may be submitted)
        self._poll_thread: threading.Thread | None = None
        if attach_to is None:
            self._launch()
        else:
            self.scheduler, self.workers, self.worker_info = (
                attach_to.scheduler,
                attach_to.workers,
                attach_to.worker_info,
            )
        try:
            assert self.scheduler is not None
            self.client_id = ray.get(self.scheduler.register_client.remote())
        except BaseException:
            self._teardown()
            raise
        self._poll_thread = threading.Thread(target=self._poll_loop, name="nanovllmx-ray-poll", daemon=True)
        self._poll_thread.start()

    def _launch(self) -> None:
        """Start the engine: placement group, one worker actor per shard, the scheduler actor."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from nanovllmx.distributed import placement
        from nanovllmx.distributed.worker_actor import WorkerActor

        cfg = self.cfg
        placement.connect_ray(cfg)
        try:
            # offline: a group of our own, stage s in bundle s; in a Serve replica (placement_bundle_offset
            # set by build_app): the replica's group, stage s in bundle offset + s (bundle 0: the replica)
            if self.owns_pg:
                self.pg, offset = placement.create_placement_group(cfg), 0
            else:
                self.pg = placement.current_placement_group(cfg)
                offset = cfg.placement_bundle_offset or 0
            tp, world = cfg.tp_size, cfg.tp_size * cfg.pp_size
            cpus = placement.num_cpus_per_worker(cfg)
            actor_cls = ray.remote(WorkerActor)
            log_level = logging.getLogger("nanovllmx").getEffectiveLevel()  # workers log as their engine does
            for rank in range(world):
                opts = placement.shard_options(cfg, rank // tp)
                # ray's stubs type options(...).remote(...) as "handle | the class": it is the handle
                self.workers.append(
                    actor_cls.options(  # type: ignore[arg-type]
                        **opts,
                        name=None,
                        max_restarts=0,
                        scheduling_strategy=PlacementGroupSchedulingStrategy(
                            self.pg, placement_group_bundle_index=offset + rank // tp
                        ),
                    ).remote(cfg, rank, cpus, log_level)
                )
            # the scheduler sits in bundle 0 (next to rank 0 offline, next to the replica under Serve),
            # using none of the bundle's resources
            # ray's typed overloads of remote() leave out concurrency_groups, which it takes
            # a poll thread per client (a long poll holds its thread while it waits)
            sched_cls = ray.remote(concurrency_groups={"poll": MAX_CLIENTS})(SchedulerActor)  # type: ignore[call-overload]
            self.scheduler = sched_cls.options(
                num_cpus=0,
                max_concurrency=1,
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=0),
            ).remote(cfg)
            init_method = None
            if world > 1:  # the rendezvous address comes from rank 0's own node
                init_method = ray.get(self.workers[0].rendezvous_address.remote())
            visible: list[list[str] | None] = [None] * world
            if world > 1 and cfg.device == "cuda":  # each worker sees its node's grid GPUs (peer memory)
                infos = ray.get([w.node_info.remote() for w in self.workers])
                visible = list(placement.node_visible_gpus(infos))
            self.worker_info = _wait_all(
                [w.init_worker.remote(init_method, v) for w, v in zip(self.workers, visible, strict=True)],
                "worker initialisation",
            )
            ray.get(self.scheduler.start.remote(self.workers))
        except BaseException:
            self._teardown()
            raise
        logger.info(
            "Ray engine up: tp_size=%d pp_size=%d on nodes %s",
            cfg.tp_size,
            cfg.pp_size,
            sorted({i["node_id"][:12] for i in self.worker_info}),
        )

    def attachment(self) -> EngineAttachment:
        """What `LLM(attach_to=...)` in another process needs to share this engine."""
        if self.scheduler is None:
            raise EngineUnavailableError("the engine has been shut down")
        return EngineAttachment(self.scheduler, list(self.workers), list(self.worker_info))

    # ---- CoreClient ----
    def add_request(self, request: EngineRequest) -> None:
        if self._closed:
            raise EngineUnavailableError("the engine has been shut down")
        with self._lock:
            if self._dead:  # a request sent to a dead actor would never get an answer
                raise EngineUnavailableError(self._dead)
            assert self.scheduler is not None  # None only once closed
            self._inflight.add(request.request_id)
            self.scheduler.submit.remote(self.client_id, next(self._seq), request)

    def abort(self, request_id: str) -> None:
        if self._closed:
            return
        with self._lock:
            assert self.scheduler is not None  # None only once closed
            self.scheduler.submit.remote(self.client_id, next(self._seq), AbortRequest(request_id))

    def stats(self) -> dict[str, Any]:
        assert self.scheduler is not None  # None only once closed
        stats: dict[str, Any] = ray.get(self.scheduler.stats.remote())
        from nanovllmx.distributed.ray_executor import stage_metrics

        stats.update(stage_metrics(self.workers, self.cfg.tp_size, self.cfg.pp_size))
        # where the grid runs: one entry per worker (rank = pp_rank * tp_size + tp_rank)
        stats["workers"] = [{k: i[k] for k in ("rank", "pp_rank", "tp_rank", "node_id")} for i in self.worker_info]
        return stats

    def prefix_summary(self, limit: int) -> list[int]:
        assert self.scheduler is not None  # None only once closed
        hashes: list[int] = ray.get(self.scheduler.prefix_summary.remote(limit))
        return hashes

    def check_health(self, timeout: float = 10.0) -> None:
        """Raise EngineUnavailableError if the engine cannot serve: shut down, scheduler actor gone
        or unresponsive, or a worker failed (the grid is then broken for good)."""
        if self._closed:
            raise EngineUnavailableError("the engine has been shut down")
        if self._dead:
            raise EngineUnavailableError(self._dead)
        if self._poll_thread is not None and not self._poll_thread.is_alive():
            raise EngineUnavailableError("the connection to the scheduler actor has stopped")
        try:
            assert self.scheduler is not None  # None only once closed
            problem = ray.get(self.scheduler.health.remote(), timeout=timeout)
        except Exception as e:  # noqa: BLE001 - dead or unresponsive actor: unhealthy either way
            raise EngineUnavailableError(f"the scheduler actor does not answer: {type(e).__name__}: {e}") from e
        if problem:
            raise EngineUnavailableError(f"the distributed engine is broken: {problem}")
        try:  # a worker that died while the engine was idle: no step has seen its socket close yet
            _wait_all([w.__ray_ready__.remote() for w in self.workers], "worker liveness", timeout)
        except Exception as e:  # noqa: BLE001 - dead or unresponsive worker: the grid cannot serve
            raise EngineUnavailableError(f"a worker actor does not answer: {type(e).__name__}: {e}") from e

    # ---- outputs ----
    def _poll_loop(self) -> None:
        while not self._closed:
            try:
                assert self.scheduler is not None  # None only once closed
                outs = ray.get(self.scheduler.get_outputs.remote(self.client_id, self.POLL_S))
            except Exception as e:
                if self._closed:
                    return
                logger.error("the scheduler actor failed: %s", e)
                self._fail_inflight(f"the Ray scheduler actor died: {type(e).__name__}: {e}")
                return
            if outs is None:  # the engine shut down (under an attached client: its owner stopped it)
                if not self._closed:
                    self._fail_inflight("the engine has been shut down")
                return
            if outs:
                with self._lock:
                    for o in outs:
                        if o.finish_reason is not None:
                            self._inflight.discard(o.request_id)
                self.sink(outs)

    def _fail_inflight(self, msg: str) -> None:
        with self._lock:
            self._dead = msg
            rids, self._inflight = list(self._inflight), set()
        if rids:
            self.sink([EngineOutput.failed(r, msg) for r in rids])

    # ---- teardown ----
    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.owns_engine:  # an attached client leaves; the engine is its owner's
            self._leave()
            return
        if self.scheduler is not None:
            try:
                ray.get(self.scheduler.shutdown.remote(), timeout=60)
            except Exception as e:
                logger.warning("scheduler actor shutdown: %s", e)
        if self._poll_thread is not None:
            self._poll_thread.join(timeout=self.POLL_S + 5)
        self._teardown()

    def _leave(self) -> None:
        """An attached client's shutdown: unregister (the engine aborts what is left of ours)."""
        if self.scheduler is not None and not self._dead:
            try:
                ray.get(self.scheduler.unregister_client.remote(self.client_id), timeout=10)
            except Exception as e:
                logger.warning("unregistering from the scheduler actor: %s", e)
        if self._poll_thread is not None:
            self._poll_thread.join(timeout=self.POLL_S + 5)
        self.scheduler, self.workers = None, []

    def _teardown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        self._closed = True
        if not self.owns_engine:
            self.scheduler, self.workers = None, []
            return
        for a in ([self.scheduler] if self.scheduler is not None else []) + self.workers:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.scheduler, self.workers = None, []
        if self.pg is not None and self.owns_pg:  # never a group we did not create (Serve removes its own)
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
        self.pg = None

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass
