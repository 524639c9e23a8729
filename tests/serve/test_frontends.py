"""Several HTTP frontends in front of one engine (build_app's `frontends`, vLLM's --api-server-count):
an `LLMEngine` replica owns the engine on Ray, `frontends` LLMServer replicas attach to its scheduler
actor. On CPU (executor: ray, gloo): concurrent streamed and whole responses through both frontends
carry the transformers reference's greedy tokens, and both frontends served some (the engine's
per-client counters); build_app refuses what it cannot combine."""

from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import pytest

from nanovllmx.utils.demo import DEMO_MODEL_NAME, demo_model_path
from tests.helpers import HFReference, free_port, random_prompt

pytestmark = pytest.mark.timeout(240)

ray = pytest.importorskip("ray")

ARGS = {"model": DEMO_MODEL_NAME, "device": "cpu", "executor": "ray", "context_len": 256, "max_bs": 8}
MAX_TOKENS = 8


# ============================================================================ build_app's options (no Ray)
def test_build_app_frontends_topology() -> None:
    from nanovllmx.serve import build_app

    app = build_app({**ARGS, "frontends": "2", "health_check_period_s": 3})
    front = app._bound_deployment
    assert front.name == "LLMServer" and front.num_replicas == 2
    rc = front._replica_config
    assert rc.ray_actor_options["num_cpus"] == 1 and not rc.ray_actor_options.get("num_gpus")
    assert rc.placement_group_bundles is None and front._deployment_config.health_check_period_s == 3
    engine = front.init_kwargs["engine"]._bound_deployment
    assert engine.name == "LLMEngine" and engine.num_replicas == 1
    assert engine._replica_config.placement_group_bundles == [{"CPU": 1.0}, {"CPU": 0.25}]  # the gang
    from nanovllmx.entrypoints.openai import api_server  # vLLM's flag

    assert api_server.app_args(api_server.parse_args(["--model", "m", "--api-server-count", "3"]))["frontends"] == 3
    for bad, match in [
        ({"frontends": 2, "executor": "local"}, "executor: ray"),
        ({"frontends": 2, "num_replicas": 2}, "several engine replicas"),
        ({"frontends": 2, "autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}, "several engine"),
        ({"frontends": 0}, "frontends must be"),
        ({"frontends": "two"}, "frontends must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            build_app({**ARGS, **bad})


# ============================================================================ on Ray
@pytest.fixture(scope="module")
def url():
    from ray import serve

    from nanovllmx.serve import build_app

    if ray.is_initialized():
        ray.shutdown()
    # 4 logical CPUs on the 2-core machine: the engine replica (1) and its worker (0.25), two frontends (1 each)
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="serve")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({**ARGS, "frontends": 2}), name="frontends", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


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


def test_concurrent_requests_through_two_frontends(url: str) -> None:
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
