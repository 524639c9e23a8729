"""Issue 20, multi-node: Serve on a Ray cluster of several nodes (ray.cluster_utils.Cluster: separate
raylets on this machine, each with its own resources standing for a machine).

- a TP=2 x PP=2 grid with one stage per node (stages on different nodes, the TP ranks of a stage on
  one node), read from the workers' node ids in /v1/engine/stats;
- two replicas (tp=1) whose engines hold one `slot` each (a node has one: a GPU box), a node holding
  one of them is removed: the other replica answers meanwhile, Serve replaces the lost one on the
  node that joins in its place.

The apps use build_app's public args only (tp_size, pp_size, placement_strategy, ray_worker_resources,
num_replicas, ray_actor_options), so the test does not depend on where the engine's placement group
comes from (the engine's own, or the replica's). Which node holds which replica is read after the
deploy (Serve's named replica actors and the replicas' /v1/engine/stats), not assumed; a deploy
whose two replicas each have a part on the other's engine node is made again.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import httpx
import pytest

ray = pytest.importorskip("ray")

from nanovllmx.utils.demo import DEMO_MODEL_NAME  # noqa: E402
from tests.helpers import free_port  # noqa: E402

pytestmark = pytest.mark.timeout(400)

CTX = 128
BODY = {"prompt": "Hello", "max_tokens": 3, "ignore_eos": True}
ENGINE = dict(
    model=DEMO_MODEL_NAME,
    device="cpu",
    executor="ray",
    context_len=CTX,
    max_bs=4,
    ray_num_cpus_per_worker=0,  # shards need only the custom resources below (torch: 1 thread each)
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=1.0,
)


@pytest.fixture(scope="module")
def cluster():
    """A head node (driver, Serve controller and proxy) and two worker nodes, a and b; each worker
    node has 1 CPU, its own resource (node_a / node_b) and one `slot`."""
    from ray import serve
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # The proxy (on the head) would send every request to a replica on its own node while that one
    # has room: let it route to all, so that /v1/engine/stats reaches each replica. The nodes'
    # processes inherit this environment.
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING", "0")
    c = Cluster(initialize_head=True, connect=True, head_node_args=dict(num_cpus=2, include_dashboard=False))
    nodes = {name: c.add_node(num_cpus=1, resources={f"node_{name}": 1, "slot": 1}) for name in ("a", "b")}
    c.wait_for_nodes()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    try:
        yield SimpleNamespace(cluster=c, nodes=nodes, url=f"http://127.0.0.1:{port}")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            c.shutdown()
            mp.undo()


def _node_ids(c) -> dict[str, str]:
    return {name: n.node_id for name, n in c.nodes.items()}


def _deploy(c, name: str, **args) -> httpx.Client:
    from ray import serve

    from nanovllmx.serve import build_app

    t0 = time.monotonic()
    serve.run(build_app({**ENGINE, **args}), name=name, route_prefix=f"/{name}")
    print(f"{name}: deployed in {time.monotonic() - t0:.1f}s")
    return httpx.Client(base_url=f"{c.url}/{name}", timeout=120)


def _complete(http: httpx.Client) -> httpx.Response:
    return http.post("/v1/completions", json=BODY)


def test_grid_stages_on_two_nodes(cluster):
    """TP=2 x PP=2: stage 0 on node b, stage 1 on node a (STRICT_SPREAD alone would split them too)."""
    from ray import serve

    http = _deploy(
        cluster,
        "grid",
        tp_size=2,
        pp_size=2,
        placement_strategy="STRICT_SPREAD",
        ray_worker_resources=[{"node_b": 0.25}, {"node_a": 0.25}],
    )
    try:
        for _ in range(2):
            r = _complete(http)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 3
        st = http.get("/v1/engine/stats").json()
        workers = sorted(st["workers"], key=lambda w: w["rank"])
        assert [(w["pp_rank"], w["tp_rank"]) for w in workers] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        ids = _node_ids(cluster)
        by_stage = {s: {w["node_id"] for w in workers if w["pp_rank"] == s} for s in (0, 1)}
        assert by_stage == {0: {ids["b"]}, 1: {ids["a"]}}, (by_stage, ids)
    finally:
        http.close()
        serve.delete("grid")


def _replicas(app: str) -> set[str]:
    """Ids of the live replicas of `app` (Serve names its replica actors SERVE_REPLICA::app#deployment#id)."""
    names = ray.util.list_named_actors(all_namespaces=True)
    return {n["name"].rsplit("#", 1)[-1] for n in names if n["name"].startswith(f"SERVE_REPLICA::{app}#")}


def _placement(http: httpx.Client, want: set[str], timeout: float = 60) -> dict[str, set[str]]:
    """replica id -> node ids of the replica actor and of its engine's workers, asking
    /v1/engine/stats until every replica in `want` answered (each call reaches one replica)."""
    got: dict[str, set[str]] = {}
    deadline = time.monotonic() + timeout
    while not want <= set(got):
        assert time.monotonic() < deadline, (want, got)
        r = http.get("/v1/engine/stats")
        if r.status_code == 200:
            st = r.json()
            got[st["replica"]] = {st["replica_node_id"]} | {w["node_id"] for w in st["workers"]}
    return got


def _running(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in status.deployments.values())


def test_node_loss_other_replica_serves_and_serve_replaces(cluster):
    from ray import serve

    ids = _node_ids(cluster)
    for attempt in range(3):
        # no prefix routing: this test reaches each replica's /v1/engine/stats through Serve's proxy,
        # which the routing ingress would answer from one replica (routing has its own tests)
        http = _deploy(cluster, "pair", num_replicas=2, ray_worker_resources={"slot": 1}, prefix_routing=False)
        replicas = _replicas("pair")
        assert len(replicas) == 2, replicas
        placed = _placement(http, replicas)
        assert {ids["a"], ids["b"]} <= set().union(*placed.values()), "one engine per slot node"
        # the node to remove holds (the actor or the engine of) exactly one replica
        users = {name: {r for r in replicas if nid in placed[r]} for name, nid in ids.items()}
        victim = next((n for n, u in users.items() if len(u) == 1), None)
        if victim is not None:
            break
        # crossed: each replica's actor on the other one's engine node (an engine's placement group
        # does not follow its replica unless the replica's own group holds it): deploy again
        print(f"attempt {attempt}: both worker nodes hold parts of both replicas: {placed}, nodes {ids}")
        http.close()
        serve.delete("pair")
    assert victim is not None, "crossed placement three times"
    try:
        (lost,) = users[victim]
        print(f"replicas on nodes {placed}; removing node {victim} {ids[victim][:12]} (replica {lost})")

        t0 = time.monotonic()
        cluster.cluster.remove_node(cluster.nodes.pop(victim))
        # the machine's stand-in: a new node with a free slot, where the replacement's engine goes
        cluster.nodes["c"] = cluster.cluster.add_node(num_cpus=1, resources={"node_c": 1, "slot": 1})
        statuses: list[int] = []
        first_ok = None
        deadline = t0 + 180
        while True:
            r = _complete(http)
            statuses.append(r.status_code)
            if r.status_code == 200:
                first_ok = first_ok if first_ok is not None else time.monotonic() - t0
            else:  # a request that reached the lost replica: a clean 5xx, never a hang
                assert r.status_code in (500, 502, 503), r.text
            now = _replicas("pair")
            if lost not in now and len(now) == 2 and _running("pair") == 2:
                break
            assert time.monotonic() < deadline, (statuses[-10:], now, serve.status().applications.get("pair"))
            time.sleep(0.3)
        replaced = time.monotonic() - t0
        (new,) = set(now) - set(replicas)
        # every request answered by a live replica from now on, the new one included
        placed = _placement(http, now)
        assert cluster.nodes["c"].node_id in placed[new], placed  # its engine took the new node's slot
        for _ in range(4):
            r = _complete(http)
            assert r.status_code == 200, r.text
        print(
            f"node {victim} removed: first 200 after {first_ok:.1f}s, {statuses.count(200)}/{len(statuses)} "
            f"requests 200 meanwhile, replica {lost} replaced by {new} (RUNNING) after {replaced:.1f}s"
        )
        assert first_ok is not None and first_ok < replaced, "the other replica must answer before the replacement"
    finally:
        http.close()
        serve.delete("pair")
