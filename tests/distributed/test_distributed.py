"""The engine on Ray (CPU, gloo): TP, PP and TP x PP grids give the local tp=1 engine's greedy tokens,
with radix-cache hits and preemption; stages placed on different nodes of a multi-node cluster; a
grid that cannot fit fails fast with a clear error; teardown releases everything.

One Ray cluster (two nodes started by ray.cluster_utils.Cluster, with custom resources node_a and
node_b standing for two machines) serves the whole module."""

from __future__ import annotations

import asyncio
import collections
import random
import time

import pytest

ray = pytest.importorskip("ray")

from nanovllmx import LLM, EngineRequestError, SamplingParams  # noqa: E402

CTX = 512
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(151643) for _ in range(n)]


PREFIX = _prompt(48, 1)
# first call fills the radix cache with PREFIX; the second call's PREFIX requests then hit it
WARM = [PREFIX + _prompt(5, 2)]
MIXED = [
    PREFIX + _prompt(7, 3),
    "Hello, my name is",
    _prompt(90, 4),
    PREFIX + _prompt(20, 5),
    _prompt(3, 6),
    "The capital of France is",
]
PREFIXED = [0, 3]  # indices of MIXED that share PREFIX
# small KV pool: 3 requests of 150 prompt tokens fit, their decodes do not -> preemption
SMALL_KV = 600
LONG = [_prompt(150, 10 + i) for i in range(4)]
LONG_PARAMS = SamplingParams(temperature=0, max_tokens=70, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from nanovllmx.utils.make_model import make_model

    return str(make_model(tmp_path_factory.mktemp("tiny-dist"), preset="tiny", seed=0, dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(
        initialize_head=True,
        connect=True,
        head_node_args=dict(num_cpus=2, resources={"node_a": 1}, include_dashboard=False),
    )
    c.add_node(num_cpus=2, resources={"node_b": 1})
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


def _node_with(resource: str) -> str:
    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"])


def _run_mixed(llm: LLM) -> tuple[list[list[int]], list[int]]:
    outs = llm.generate(WARM, GREEDY) + llm.generate(MIXED, GREEDY)
    return [o.token_ids for o in outs], [o.num_cached_tokens for o in outs]


# logprobs and penalties travel the worker -> scheduler actor path (micro-batches merged on PP grids)
FEATURES = [_prompt(30, 20), _prompt(9, 21), _prompt(14, 22)]
FEATURE_PARAMS = [
    SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3, prompt_logprobs=2),
    SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True, logit_bias={11: 30.0, 42: 29.0}, frequency_penalty=2.0
    ),
    SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1, repetition_penalty=1.5, min_tokens=2),
]


def _run_features(llm: LLM) -> list[tuple]:
    def lps(x):
        return None if x is None else [None if t is None else (t.token_id, t.logprob) for t in x]

    outs = llm.generate(FEATURES, FEATURE_PARAMS)
    return [(o.token_ids, lps(o.logprobs), lps(o.prompt_logprobs)) for o in outs]


def _same_features(got: list[tuple], want: list[tuple]) -> None:
    """Tokens and logprob token ids equal, logprobs within 1e-3 (reductions differ across grids)."""
    for g, w in zip(got, want, strict=True):
        assert g[0] == w[0]
        for gl, wl in zip(g[1:], w[1:]):
            assert (gl is None) == (wl is None)
            if gl is not None:
                assert [t and t[0] for t in gl] == [t and t[0] for t in wl]
                assert all(a is None or abs(a[1] - b[1]) < 1e-3 for a, b in zip(gl, wl))


def _run_long(llm: LLM) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(LONG, LONG_PARAMS)]


@pytest.fixture(scope="module")
def reference(model_dir) -> dict:
    """The local, single-process engine (tp=1)."""
    llm = LLM(model_dir, context_len=CTX, executor="local")
    mixed, cached = _run_mixed(llm)
    features = _run_features(llm)
    llm.shutdown()
    llm = LLM(model_dir, context_len=CTX, executor="local", num_kv_slots=SMALL_KV)
    long = _run_long(llm)
    preempted = llm.stats()["num_preempted_total"]
    llm.shutdown()
    assert all(c > 0 for c in (cached[1 + i] for i in PREFIXED))
    assert preempted > 0, "the small-KV workload must preempt"
    return dict(mixed=mixed, long=long, features=features)


def _check_placement(llm: LLM, tp: int, pp: int) -> None:
    info = sorted(llm.core.worker_info, key=lambda i: i["rank"])
    assert [i["rank"] for i in info] == list(range(tp * pp))
    for i in info:
        assert (i["pp_rank"], i["tp_rank"]) == divmod(i["rank"], tp)
    for stage in range(pp):  # TP ranks of a stage share a node
        assert len({i["node_id"] for i in info if i["pp_rank"] == stage}) == 1


def _check_stats(llm: LLM) -> dict:
    st = llm.stats()
    assert st["num_running"] == 0 and st["num_waiting"] == 0
    assert st["num_timed_steps"] > 0
    for k in ("control_plane_ms_per_step", "worker_busy_ms_per_step", "scheduler_ms_per_step"):
        assert st[k] is not None and st[k] > 0, (k, st)
    return st


@pytest.mark.parametrize(
    "tp,pp,mode,overlap",
    [
        (2, 1, "socket", True),
        (1, 2, "socket", True),
        (2, 2, "socket", True),
        (2, 1, "ray", False),
        (1, 1, "socket", True),
    ],
    ids=["tp2", "pp2", "tp2xpp2", "tp2-raysteps-sync", "1x1-on-ray"],
)
def test_grid_matches_local(cluster, model_dir, reference, tp, pp, mode, overlap):
    # pp > 1: every step, decode included, is split into pp micro-batches (and pipeline lanes)
    llm = LLM(
        model_dir,
        context_len=CTX,
        tp_size=tp,
        pp_size=pp,
        executor="ray",
        ray_step_mode=mode,
        pp_microbatch_min_tokens=1,
        overlap_scheduling=overlap,
    )
    try:
        _check_placement(llm, tp, pp)
        tokens, cached = _run_mixed(llm)
        assert tokens == reference["mixed"]
        _same_features(_run_features(llm), reference["features"])
        for i in PREFIXED:
            assert cached[1 + i] > 0, "expected radix-cache hits on the shared prefix"
        st = _check_stats(llm)
        assert st["pp_microbatches"] == pp
        assert st["overlap"] == overlap  # a pipeline overlaps through its lanes
    finally:
        llm.shutdown()


def test_grid_preemption_matches_local(cluster, model_dir, reference):
    llm = LLM(model_dir, context_len=CTX, tp_size=2, pp_size=2, num_kv_slots=SMALL_KV)
    try:
        assert _run_long(llm) == reference["long"]
        st = _check_stats(llm)
        assert st["num_preempted_total"] > 0
        assert st["num_slots"] == SMALL_KV
    finally:
        llm.shutdown()


# ---- inter-step pipelining (pp > 1): several batches of disjoint requests in flight ----
# one engine configuration for the whole mix: a 64-token budget chunks every long prompt, the small
# pool preempts LONG's decodes, WARM makes MIXED's PREFIX requests radix hits
PIPE_KW = dict(context_len=CTX, num_kv_slots=SMALL_KV, max_num_batched_tokens=64)
SEEDED = [
    SamplingParams(temperature=0.9, top_k=40 if i % 2 else 0, seed=100 + i, max_tokens=10, ignore_eos=True)
    for i in range(len(MIXED))
]
ABORT_KEEP = [_prompt(30 + 7 * i, 40 + i) for i in range(4)]  # run next to a request aborted mid-way


async def _with_abort(llm: LLM) -> list[list[int]]:
    """ABORT_KEEP's greedy tokens, streamed while a long request is aborted after 3 deltas."""

    async def one(p: list[int]) -> list[int]:
        out: list[int] = []
        async for d in llm.stream(p, GREEDY):
            out = list(d.token_ids)
        return out

    keep = [asyncio.ensure_future(one(p)) for p in ABORT_KEEP]
    await _first_deltas(llm, 3)
    return list(await asyncio.gather(*keep))


def _run_pipeline_mix(llm: LLM) -> dict:
    mixed, cached = _run_mixed(llm)
    seeded = [o.token_ids for o in llm.generate(MIXED, SEEDED)]
    return dict(
        mixed=mixed,
        cached=cached,
        seeded=seeded,
        long=_run_long(llm),
        aborted=asyncio.run(_with_abort(llm)),
        features=_run_features(llm),  # logprobs and penalties through the lanes
    )


@pytest.fixture(scope="module")
def pipe_reference(model_dir) -> dict:
    llm = LLM(model_dir, executor="local", **PIPE_KW)
    try:
        ref = _run_pipeline_mix(llm)
        assert llm.stats()["num_preempted_total"] > 0, "the mix must preempt"
    finally:
        llm.shutdown()
    return ref


@pytest.mark.parametrize(
    "tp,pp,overlap",
    [(1, 2, False), (1, 2, True), (1, 4, True), (2, 2, True)],
    ids=["pp2", "pp2-overlap", "pp4-overlap", "tp2xpp2-overlap"],
)
def test_pipeline_lanes_match_local(cluster, model_dir, pipe_reference, tp, pp, overlap):
    """Pipeline lanes (the defaults: pp + 1 batches in flight; with overlap scheduling pp lanes plus
    one batch whose placeholders the first stage takes from the last stage's ids): greedy and
    seeded tokens equal the local tp=1 engine's, with chunked prefill, radix hits, preemption and
    an abort in the mix."""
    llm = LLM(model_dir, tp_size=tp, pp_size=pp, overlap_scheduling=overlap, **PIPE_KW)
    try:
        got = _run_pipeline_mix(llm)
        for k in ("mixed", "seeded", "long", "aborted"):
            assert got[k] == pipe_reference[k], k
        _same_features(got["features"], pipe_reference["features"])
        assert all(got["cached"][1 + i] > 0 for i in PREFIXED)
        st = _check_stats(llm)
        lanes = pp if overlap else pp + 1
        assert st["pipeline_lanes"] == lanes and st["overlap"] == overlap, st
        assert 1 < st["max_inflight_steps"] <= lanes + overlap, st
        assert st["num_preempted_total"] > 0
        # every stage reports its busy share (CPU: stages on shared cores, so no bound on the value)
        assert len(st["stage_busy_share"]) == pp and all(0 < b <= 1 for b in st["stage_busy_share"]), st
        assert all(ms > 0 for ms in st["stage_busy_ms_per_step"]) and st["tp_one_shot_allreduce"] is False
    finally:
        llm.shutdown()


def test_stages_on_different_nodes(cluster, model_dir, reference):
    node_a, node_b = _node_with("node_a"), _node_with("node_b")
    # stage 0 pinned to node_b (not the head: rank 0's rendezvous address is not the driver's),
    # stage 1 to node_a; STRICT_SPREAD alone would also split them
    llm = LLM(
        model_dir,
        context_len=CTX,
        tp_size=2,
        pp_size=2,
        placement_strategy="STRICT_SPREAD",
        ray_worker_resources=[{"node_b": 0.1}, {"node_a": 0.1}],
    )
    try:
        _check_placement(llm, 2, 2)
        nodes = {i["pp_rank"]: i["node_id"] for i in llm.core.worker_info}
        assert nodes == {0: node_b, 1: node_a}
        tokens, _ = _run_mixed(llm)
        assert tokens == reference["mixed"]
    finally:
        llm.shutdown()


def test_unfit_grid_raises_quickly(cluster, model_dir):
    from ray.util import placement_group_table

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)cannot place.*tp_size=8.*no_such_resource"):
        LLM(model_dir, context_len=CTX, tp_size=8, ray_worker_resources={"no_such_resource": 1}, placement_timeout_s=2)
    assert time.monotonic() - t0 < 30
    with pytest.raises(RuntimeError, match="cannot place"):  # a bundle of 8 CPUs fits no 2-CPU node
        LLM(model_dir, context_len=CTX, tp_size=8, ray_num_cpus_per_worker=1, placement_timeout_s=1)
    assert all(pg["state"] == "REMOVED" for pg in placement_group_table().values())


def _released() -> bool:
    from ray.util import placement_group_table

    return all(pg["state"] == "REMOVED" for pg in placement_group_table().values()) and ray.available_resources().get(
        "CPU", 0
    ) == ray.cluster_resources().get("CPU")


async def _first_deltas(llm: LLM, n: int) -> list:
    """Read n deltas of a long greedy stream, then leave it (which aborts the request)."""
    got = []
    async for d in llm.stream(_prompt(20, 99), SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)):
        got.append(d)
        if len(got) == n:
            break
    return got


def test_shutdown_then_second_llm(cluster, model_dir, reference):
    llm = LLM(model_dir, context_len=CTX, tp_size=2)

    assert len(asyncio.run(_first_deltas(llm, 3))) == 3  # a stream cancelled early aborts its request
    deadline = time.monotonic() + 60
    while llm.stats()["num_running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert llm.stats()["num_running"] == 0

    # a worker that dies fails the requests instead of hanging them, and health says so
    llm.core.check_health()
    ray.kill(llm.core.workers[1], no_restart=True)
    with pytest.raises(EngineRequestError):
        llm.generate(["Hello"], GREEDY)
    with pytest.raises(RuntimeError, match="broken"):
        llm.core.check_health()
    actors = [llm.core.scheduler] + llm.core.workers
    t0 = time.monotonic()
    llm.shutdown()
    assert time.monotonic() - t0 < 60
    for a in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(a.node_info.remote() if a is not actors[0] else a.ping.remote(), timeout=30)
    print(f"shutdown took {time.monotonic() - t0:.1f}s")
    deadline = time.monotonic() + 60
    while not _released() and time.monotonic() < deadline:
        time.sleep(0.2)
    from ray.util import placement_group_table

    print(f"released after {time.monotonic() - t0:.1f}s")
    assert _released(), (
        {k: (v["state"], v["bundles"]) for k, v in placement_group_table().items()},
        ray.available_resources().get("CPU"),
        ray.cluster_resources().get("CPU"),
    )

    llm2 = LLM(model_dir, context_len=CTX, tp_size=1, pp_size=2, pp_microbatches=1)  # synchronous pipeline
    try:
        tokens, _ = _run_mixed(llm2)
        assert tokens == reference["mixed"]
    finally:
        llm2.shutdown()


def test_attached_client_shares_the_engine(cluster, model_dir, reference):
    """A second LLM attached to a running engine (an HTTP frontend's, serve/app.py): both get the
    local engine's tokens at once; its shutdown leaves the engine serving; when the owner shuts the
    engine down, an attached client's requests in flight fail instead of hanging."""
    from concurrent.futures import ThreadPoolExecutor

    owner = LLM(model_dir, context_len=CTX, executor="ray")
    front = LLM(model_dir, context_len=CTX, executor="ray", attach_to=owner.attachment())
    try:
        assert front.core.workers == owner.core.workers and front.core.pg is None
        with ThreadPoolExecutor(1) as pool:
            theirs = pool.submit(front.generate, MIXED[3:], GREEDY)
            mine = owner.generate(WARM + MIXED[:3], GREEDY)
            got = [o.token_ids for o in mine + theirs.result(timeout=120)]
        assert got == reference["mixed"]
        front.check_health()
        assert front.stats()["clients"].keys() == {str(owner.core.client_id), str(front.core.client_id)}
        front.shutdown()  # leaves: the engine keeps serving its owner
        assert str(front.core.client_id) not in owner.stats()["clients"]
        owner.check_health()
        assert owner.generate(WARM, GREEDY)[0].token_ids == reference["mixed"][0]

        late = LLM(model_dir, context_len=CTX, executor="ray", attach_to=owner.attachment())
        long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

        async def run_then_stop_engine():
            rs = late.submit(MIXED[2], long)
            await rs.__anext__()
            owner.shutdown()
            async for _ in rs:
                pass

        with pytest.raises(EngineRequestError, match="shut down|died"):  # whichever the poll sees first
            asyncio.run(run_then_stop_engine())
        with pytest.raises(RuntimeError):
            late.check_health()
        late.shutdown()
    finally:
        front.shutdown()
        owner.shutdown()


def test_split_batch():
    import numpy as np

    from nanovllmx.distributed.microbatch import split_batch, split_points
    from nanovllmx.scheduler.messages import SamplingArrays, ScheduledBatch

    q = np.array([100, 1, 1, 30, 1, 60, 1, 1], np.int32)
    B, T = len(q), int(q.sum())
    sample_rows = np.array([1, 2, 4, 5, 6, 7], np.int32)  # rows 0 and 3 are mid-prefill chunks
    S = len(sample_rows)
    sa = SamplingArrays(
        np.arange(S, dtype=np.float32),
        np.ones(S, np.float32),
        np.zeros(S, np.int32),
        np.zeros(S, np.float32),
        np.arange(S, dtype=np.int64),
        np.arange(S, dtype=np.int32),
        False,
        False,
    )
    b = ScheduledBatch(
        step=7,
        req_indices=np.arange(10, 10 + B, dtype=np.int32),
        start_pos=np.arange(B, dtype=np.int32) * 3,
        q_lens=q,
        input_ids=np.arange(T, dtype=np.int32),
        out_slots=np.arange(1000, 1000 + T, dtype=np.int32),
        table_rows=np.array([13, 13, 15], np.int32),
        table_cols=np.array([0, 1, 0], np.int32),
        table_slots=np.array([5, 6, 7], np.int32),
        sample_rows=sample_rows,
        sampling=sa,
    )
    assert split_points(q, 3) == [0, 1, 4, 8] and split_points(q, 20)[-1] == B
    for m in (1, 2, 3, 8):
        parts = split_batch(b, m)
        assert len(parts) == min(m, B)
        cat = lambda f, parts=parts: np.concatenate([getattr(p, f) for p in parts])
        for f in ("req_indices", "start_pos", "q_lens", "input_ids", "out_slots"):
            assert (cat(f) == getattr(b, f)).all(), f
        assert sorted(zip(cat("table_rows"), cat("table_slots"))) == [(13, 5), (13, 6), (15, 7)]
        for p in parts:  # a prefix write travels with its request
            assert set(p.table_rows.tolist()) <= set(p.req_indices.tolist())
        offs = np.cumsum([0] + [p.num_reqs for p in parts[:-1]])
        assert (np.concatenate([p.sample_rows + o for p, o in zip(parts, offs)]) == sample_rows).all()
        assert (np.concatenate([p.sampling.temperature for p in parts]) == sa.temperature).all()
        assert all(p.step == 7 for p in parts)


def test_overlap_preemption_and_abort_matches_local(cluster, model_dir, reference):
    # overlap scheduling (off by default on CPU) on a 1x1 Ray grid: the worker launches step N+1 before
    # step N's ids are sent; preemption recomputes requests while steps are in flight
    llm = LLM(model_dir, context_len=CTX, executor="ray", num_kv_slots=SMALL_KV, overlap_scheduling=True)
    try:
        assert _run_long(llm) == reference["long"]
        st = _check_stats(llm)
        assert st["overlap"] and st["num_preempted_total"] > 0

        assert len(asyncio.run(_first_deltas(llm, 3))) == 3  # leaving the stream early aborts it mid-flight
        assert [o.token_ids for o in llm.generate(WARM, GREEDY)] == reference["mixed"][:1]
    finally:
        llm.shutdown()


class _FakeWorker:
    """Stands in for nanovllmx.worker.Worker in the worker loop: step `s`'s ids are [s], ready once
    `gates[s]` is set; a step in `fail_launch` raises when launched, one in `fail_result` in result()."""

    def __init__(self):
        import threading

        self.launched: list[int] = []
        self.gates = collections.defaultdict(threading.Event)
        self.fail_launch: set[int] = set()
        self.fail_result: set[int] = set()

    def execute_async(self, batch):
        import numpy as np

        if batch.step in self.fail_launch:
            raise RuntimeError(f"launch of step {batch.step} failed")
        self.launched.append(batch.step)
        gate, fail = self.gates[batch.step], batch.step in self.fail_result

        class Handle:
            def result(self):
                assert gate.wait(30)
                if fail:
                    raise RuntimeError(f"step {batch.step} failed on the device")
                from nanovllmx.scheduler.messages import StepOutput

                return StepOutput(np.array([batch.step], np.int32))

        return Handle()


def _fake_loop(fake: _FakeWorker):
    """A WorkerActor step loop (overlap on, the result rank) around `fake`, without Ray."""
    from types import SimpleNamespace

    from nanovllmx.distributed import control
    from nanovllmx.distributed.worker_actor import WorkerActor

    actor = object.__new__(WorkerActor)
    actor.cfg, actor.rank, actor.node_ip, actor.worker = SimpleNamespace(device="cpu"), 0, "127.0.0.1", fake
    actor._loop_error, actor._loop_thread = None, None
    server = control.ControlServer("127.0.0.1", bind="127.0.0.1")
    actor.start_loop(server.address, result_rank=0, overlap=True)
    server.accept(1, timeout=30)
    step = lambda s: server.broadcast(control.STEP, control.dumps(SimpleNamespace(step=s, mask_deferred=False)))
    result = lambda: control.unpack_result(server.wait_result(0))
    return actor, server, step, result


def _until(cond, timeout=30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def test_worker_loop_overlaps_launches():
    from nanovllmx.distributed import control

    fake = _FakeWorker()
    actor, server, step, result = _fake_loop(fake)
    try:
        step(0)
        step(1)
        assert _until(lambda: fake.launched == [0, 1])  # step 1 launched while step 0 is not ready
        step(2)  # step 2 would copy its ids into step 0's host buffer: it waits until step 0 is read
        time.sleep(0.3)
        assert fake.launched == [0, 1]
        fake.gates[0].set()
        s, ids, gap, busy = result()
        assert (s, ids.tokens.tolist(), gap) == (0, [0], -1) and busy > 0
        assert _until(lambda: fake.launched == [0, 1, 2])
        fake.gates[1].set()
        fake.gates[2].set()
        # no further step comes, yet the results are sent, in order
        s, ids, gap, busy = result()
        assert (s, ids.tokens.tolist(), gap) == (1, [1], 0) and busy > 0  # launched ahead: no device gap
        assert result()[0] == 2
        # a failed launch reports an ERROR frame with the traceback
        fake.fail_launch.add(3)
        step(3)
        with pytest.raises(control.ControlError, match="launch of step 3 failed"):
            result()
        actor._loop_thread.join(30)
        assert not actor._loop_thread.is_alive() and "launch of step 3 failed" in actor._loop_error
    finally:
        for g in fake.gates.values():
            g.set()
        server.close()

    # a step that fails on the device (in the sender thread) is reported too; STOP then ends the loop
    fake = _FakeWorker()
    fake.fail_result.add(1)
    actor, server, step, result = _fake_loop(fake)
    try:
        fake.gates[0].set()
        fake.gates[1].set()
        step(0)
        step(1)
        assert result()[0] == 0
        with pytest.raises(control.ControlError, match="step 1 failed on the device"):
            result()
        server.broadcast(control.STOP)
        actor._loop_thread.join(30)
        assert not actor._loop_thread.is_alive() and "step 1 failed on the device" in actor._loop_error
    finally:
        server.close()


def test_node_visible_gpus_per_node():
    """Each worker is shown its engine's GPUs on its own node (for peer memory between TP ranks) in
    one order on every rank, and nothing of another node."""
    from nanovllmx.distributed.placement import node_visible_gpus

    infos = [
        {"node_id": "a", "gpu_ids": ["3"]},
        {"node_id": "a", "gpu_ids": ["10"]},
        {"node_id": "b", "gpu_ids": ["0"]},
        {"node_id": "a", "gpu_ids": ["2"]},
    ]
    got = node_visible_gpus(infos)
    assert got == [["2", "3", "10"], ["2", "3", "10"], ["0"], ["2", "3", "10"]]  # numeric order, not "10" < "2"
    assert [v.index(i["gpu_ids"][0]) for v, i in zip(got, infos, strict=True)] == [1, 2, 0, 0]
