"""Gang placement through Serve (issue 20): a replica whose engine runs on Ray gets one placement
group from Serve (`placement_group_bundles`: bundle 0 = the replica and the scheduler actor, then
one bundle per pipeline stage) and the engine's actors run inside it; an offline LLM keeps creating
(and removing) a group of its own; a grid that cannot fit shows as a Serve status message. Several
HTTP frontends (`frontends: 2`, issue 25): one engine replica with the gang group, two CPU-only
frontends attached to its scheduler actor.

One Ray instance for the module (4 logical CPUs on the 2-core machine), with Serve's slow-startup
warning lowered to 3 s (RAY_SERVE_SLOW_STARTUP_WARNING_S, read by the controller) so the status of
an unplaceable grid shows quickly; Serve's default is 30 s.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import time

import httpx
import pytest

from nanovllmx.utils.demo import DEMO_MODEL_NAME, demo_model_path
from tests.helpers import HFReference, free_port, random_prompt

pytestmark = pytest.mark.timeout(240)

ray = pytest.importorskip("ray")

CTX = 256
SLOW_STARTUP_S = 3
FRONT_ARGS = {"model": DEMO_MODEL_NAME, "device": "cpu", "executor": "ray", "context_len": CTX, "max_bs": 8}
MAX_TOKENS = 8
ENV = {"RAY_SERVE_SLOW_STARTUP_WARNING_S": str(SLOW_STARTUP_S), "RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S": "1"}


# ============================================================================ build_app's options (no Ray)
def _options(**args):
    from nanovllmx.serve import build_app

    app = build_app({"model": DEMO_MODEL_NAME, **args})
    d = app._bound_deployment
    return d._replica_config, d.init_args[2]  # replica config, engine_kwargs


def test_build_app_declares_the_gang_bundles():
    rc, ek = _options(device="cpu", tp_size=2, pp_size=2, ray_actor_options={"num_cpus": 0.5})
    assert rc.placement_group_bundles == [{"CPU": 0.5}, {"CPU": 0.5}, {"CPU": 0.5}]  # replica, stage 0, stage 1
    assert rc.placement_group_strategy == "PACK"
    assert ek["executor"] == "ray" and ek["placement_bundle_offset"] == 1
    # on GPU: a stage = tp GPUs in one bundle; the replica keeps no GPU; the engine's strategy maps onto Serve's
    rc, ek = _options(device="cuda", tp_size=2, pp_size=2, placement_strategy="spread")
    assert rc.placement_group_bundles == [{"CPU": 1.0}, {"GPU": 2.0}, {"GPU": 2.0}]
    assert rc.placement_group_strategy == "SPREAD" and rc.ray_actor_options["num_gpus"] == 0
    assert ek["executor"] == "ray" and ek["placement_bundle_offset"] == 1
    # the local executor (CPU, one shard): no group at all
    rc, ek = _options(device="cpu")
    assert rc.placement_group_bundles is None and "placement_bundle_offset" not in ek
    # opting out: the engine creates its own group, as offline
    rc, ek = _options(device="cpu", tp_size=2, placement_bundle_offset=None)
    assert rc.placement_group_bundles is None and ek["placement_bundle_offset"] is None
    # the operator's own bundles are kept; stages from bundle 1
    rc, ek = _options(device="cpu", tp_size=2, placement_group_bundles=[{"CPU": 1}, {"CPU": 2}])
    assert rc.placement_group_bundles == [{"CPU": 1}, {"CPU": 2}] and ek["placement_bundle_offset"] == 1
    with pytest.raises(ValueError, match="max_replicas_per_node"):
        _options(device="cpu", tp_size=2, max_replicas_per_node=1)


def test_build_app_frontends_topology() -> None:
    """frontends > 1: LLMEngine (1 replica, the gang group) and N CPU-only LLMServer frontends."""
    from nanovllmx.serve import build_app

    app = build_app({**FRONT_ARGS, "frontends": "2", "health_check_period_s": 3})
    front = app._bound_deployment
    assert front.name == "LLMServer" and front.num_replicas == 2
    rc = front._replica_config
    assert rc.ray_actor_options["num_cpus"] == 1 and not rc.ray_actor_options.get("num_gpus")
    assert rc.placement_group_bundles is None and front._deployment_config.health_check_period_s == 3
    assert front.init_kwargs["frontends"] == 2  # each admits half the engine's queue bound
    engine = front.init_kwargs["engine"]._bound_deployment
    assert engine.name == "LLMEngine" and engine.num_replicas == 1
    assert engine._replica_config.placement_group_bundles == [{"CPU": 1.0}, {"CPU": 0.25}]  # the gang
    from nanovllmx.entrypoints.openai import api_server  # vLLM's flag

    assert api_server.app_args(api_server.parse_args(["--model", "m", "--api-server-count", "3"]))["frontends"] == 3
    # executor auto (the CPU's default is in-process) takes Ray when frontends share the engine
    auto = build_app({**FRONT_ARGS, "executor": "auto", "frontends": 2})._bound_deployment
    assert auto.init_kwargs["engine"]._bound_deployment.init_args[2]["executor"] == "ray"
    for bad, match in [
        ({"frontends": 2, "executor": "local"}, "set it to ray"),
        ({"frontends": 2, "num_replicas": 2}, "several engine replicas"),
        ({"frontends": 2, "autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}, "several engine"),
        ({"frontends": 0}, "frontends must be"),
        ({"frontends": "two"}, "frontends must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            build_app({**FRONT_ARGS, **bad})


def test_build_app_warns_when_frontends_cannot_be_placed(monkeypatch, caplog) -> None:
    """frontends: 4 on a 2-CPU cluster would leave frontends pending without an error from Serve:
    build_app says so (a warning: an autoscaling cluster may still add CPUs)."""
    import ray

    from nanovllmx.serve import build_app

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with caplog.at_level("WARNING", logger="nanovllmx.serve.builder"):
        build_app({**FRONT_ARGS, "frontends": 4})
    (msg,) = [r.getMessage() for r in caplog.records if "frontends" in r.getMessage()]
    assert "need 5.25 CPUs" in msg and "has 2" in msg  # 4 x 1 + the engine's gang (1 + 0.25)
    caplog.clear()
    with caplog.at_level("WARNING", logger="nanovllmx.serve.builder"):  # fractional frontends fit
        build_app({**FRONT_ARGS, "frontends": 2, "ingress_options": {"ray_actor_options": {"num_cpus": 0.25}}})
    assert not [r for r in caplog.records if "frontends" in r.getMessage()]


# ============================================================================ on Ray
@pytest.fixture(scope="module")
def ray_instance():
    if ray.is_initialized():
        ray.shutdown()
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)  # inherited by the Serve controller that ray.init's raylet starts
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="serve")
    try:
        yield
    finally:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="module")
def serve_url(ray_instance):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def _live_groups() -> dict[str, dict]:
    from ray.util import placement_group_table

    return {k: v for k, v in placement_group_table().items() if v["state"] != "REMOVED"}


def _wait_no_groups(timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _live_groups():
        assert time.monotonic() < deadline, f"placement groups left: {_live_groups()}"
        time.sleep(0.2)


def _bundle_used(pg_id: str, index: int) -> float:
    """CPU of bundle `index` of group `pg_id` that actors hold (Ray's per-bundle resources)."""
    key = f"CPU_group_{index}_{pg_id}"
    total = ray.cluster_resources().get(key, 0.0)
    return total - ray.available_resources().get(key, 0.0)


def test_replica_runs_its_grid_in_its_own_group(serve_url):
    """pp_size=2 on CPU: the replica's group (from Serve) is the only one; its stage bundles are taken
    by the workers; the app answers; deleting the app leaves no group."""
    from ray import serve

    from nanovllmx.serve import build_app

    _wait_no_groups()
    app = build_app(
        {
            "model": DEMO_MODEL_NAME,
            "device": "cpu",
            "context_len": CTX,
            "max_bs": 4,
            "pp_size": 2,
            "ray_actor_options": {"num_cpus": 0.5},
        }
    )
    t0 = time.monotonic()
    serve.run(app, name="gang", route_prefix="/gang")
    print(f"gang app (pp_size=2) up in {time.monotonic() - t0:.1f}s")
    try:
        groups = _live_groups()
        assert len(groups) == 1, groups  # the replica's, no second one from the engine
        ((pg_id, pg),) = groups.items()
        assert pg["state"] == "CREATED" and pg["strategy"] == "PACK"
        assert list(pg["bundles"].values()) == [{"CPU": 0.5}, {"CPU": 0.25}, {"CPU": 0.25}]
        # bundle 0: the replica (0.5 CPU; the scheduler actor takes none); bundles 1, 2: one worker each
        assert [_bundle_used(pg_id, i) for i in range(3)] == pytest.approx([0.5, 0.25, 0.25])
        assert ray.available_resources().get("CPU", 0.0) == pytest.approx(4 - 1.0)  # nothing outside the group
        r = httpx.post(
            f"{serve_url}/gang/v1/completions",
            json={"prompt": "Hello", "max_tokens": 4, "ignore_eos": True},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
    finally:
        serve.delete("gang")
    t0 = time.monotonic()
    _wait_no_groups()
    print(f"group removed {time.monotonic() - t0:.1f}s after serve.delete returned")


def _complete(url: str, prompt: list[int], stream: bool) -> list[int]:
    body = {
        "model": DEMO_MODEL_NAME,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream": stream,
    }
    if not stream:
        r = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return list(r.json()["choices"][0]["token_ids"])
    ids: list[int] = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ids += json.loads(line[6:])["choices"][0].get("token_ids") or []
    return ids


def test_frontends_share_one_engine(serve_url: str) -> None:
    """frontends: 2 on CPU (executor: ray, gloo): concurrent streamed and whole requests through both
    frontends carry transformers' greedy tokens; both frontends served some (the engine's per-client
    counters); only the engine's gang group exists; deleting the app leaves no group."""
    from ray import serve

    from nanovllmx.serve import build_app

    _wait_no_groups()
    serve.run(build_app({**FRONT_ARGS, "frontends": 2}), name="fe", route_prefix="/fe")
    try:
        _check_frontends(serve_url + "/fe")
        assert len(_live_groups()) == 1  # the engine's; the frontends are plain CPU replicas
    finally:
        serve.delete("fe")
    _wait_no_groups()


def _check_frontends(url: str) -> None:
    prompts = [random_prompt(6 + i, seed=100 + i) for i in range(12)]
    with cf.ThreadPoolExecutor(12) as pool:
        futs = [pool.submit(_complete, url, p, i % 2 == 0) for i, p in enumerate(prompts)]
        ref = HFReference(demo_model_path())  # loads while the requests run
        got = [f.result(timeout=180) for f in futs]
    assert got == [ref.greedy(p, MAX_TOKENS) for p in prompts]
    stats = httpx.get(url + "/v1/engine/stats", timeout=30).json()
    per_client = sorted(c["num_requests"] for c in stats["clients"].values())
    # the engine's owner (no requests of its own) and two frontends, which shared the 12 requests
    assert len(per_client) == 3 and per_client[0] == 0 and per_client[1] > 0 and sum(per_client) == 12, stats
    assert all(c["num_unfinished"] == 0 for c in stats["clients"].values())
    assert httpx.get(url + "/health", timeout=30).status_code == 200


def test_offline_llm_creates_and_removes_its_own_group(ray_instance, tiny_model_dir):
    from nanovllmx import LLM

    _wait_no_groups()
    llm = LLM(str(tiny_model_dir), executor="ray", device="cpu", context_len=CTX, max_bs=2, tp_size=2)
    try:
        groups = _live_groups()
        assert len(groups) == 1, groups
        ((pg_id, pg),) = groups.items()
        assert list(pg["bundles"].values()) == [{"CPU": 0.5}]  # one stage of 2 shards x 0.25 CPU
        assert llm.core.owns_pg and llm.core.pg.id.hex() == pg_id
    finally:
        llm.shutdown()
    _wait_no_groups(timeout=10)


def test_offset_without_a_group_is_a_clear_error(ray_instance, tiny_model_dir):
    from nanovllmx import LLM

    with pytest.raises(RuntimeError, match="runs in none"):
        LLM(str(tiny_model_dir), executor="ray", device="cpu", context_len=CTX, placement_bundle_offset=1)
    _wait_no_groups(timeout=10)


def test_unplaceable_grid_shows_in_serve_status(serve_url):
    """A stage bundle no node can hold: Serve cannot schedule the replica. serve.status() says so (the
    deployment stays DEPLOYING with a message naming the bundles) within SLOW_STARTUP_S + a few
    seconds; the replica never starts, so nothing waits inside it. Deleting the app takes up to
    graceful_shutdown_timeout_s (Serve kills a replica that never started only then)."""
    from ray import serve
    from ray.serve.api import _run

    from nanovllmx.serve import build_app

    app = build_app(
        {
            "model": DEMO_MODEL_NAME,
            "device": "cpu",
            "context_len": CTX,
            "tp_size": 2,
            "ray_num_cpus_per_worker": 8,  # a 16-CPU bundle on a 4-CPU cluster
            "ray_actor_options": {"num_cpus": 0.5},
            # Serve force-kills a replica it could never schedule only after this (120 s by default)
            "graceful_shutdown_timeout_s": 5,
        }
    )
    t0 = time.monotonic()
    _run(app, name="toobig", route_prefix="/toobig", _blocking=False)  # serve.run would wait for the replica
    try:
        deadline = time.monotonic() + 60
        while True:
            st = serve.status().applications.get("toobig")
            dep = st.deployments.get("LLMServer") if st else None
            if dep is not None and "to be scheduled" in dep.message:
                break
            assert time.monotonic() < deadline, f"no scheduling message after 60s: {st}"
            time.sleep(0.5)
        took = time.monotonic() - t0
        print(f"unplaceable grid: {st.status} / {dep.status} after {took:.1f}s: {dep.message}")
        assert str(st.status) in ("DEPLOYING", "ApplicationStatus.DEPLOYING"), st.status
        assert '"CPU": 16.0' in dep.message, dep.message  # the stage bundle it cannot place
        assert dep.replica_states.get("RUNNING", 0) == 0
    finally:
        t1 = time.monotonic()
        serve.delete("toobig")
        print(f"deleted in {time.monotonic() - t1:.1f}s")
    _wait_no_groups()
