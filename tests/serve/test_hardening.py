"""Hostile clients (issue 19), over HTTP on the real Serve app (demo checkpoint, CPU): a client's own
chat template (refused by default; with trust, stopped by its time budget while /health reports the
stuck worker), the API key, no local path in /v1/models, and the per-request bounds (stop strings,
an 8 MB prompt). docs/reliability.md ("Hostile clients") lists the times measured here.

Two apps share one Ray + Serve instance: `plain` (the defaults, the model given as a local folder)
and `guarded` (trusted client templates with a 2 s budget, an API key).
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from nanovllmx.utils.demo import DEMO_MODEL_NAME, demo_model_path
from tests.helpers import free_port

pytestmark = pytest.mark.timeout(400)

CTX = 512
KEY = "sk-hardening-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
BUDGET_S = 2.0  # the guarded app's chat_template_timeout_s
STUCK_AFTER_S = 0.5  # the guarded app's prompt_job_stuck_after_s
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True}
# 10^10 iterations: hours of rendering without a budget (Jinja's sandbox caps each range() at 100 000)
NESTED_LOOPS = "{% for a in range(100000) %}{% for b in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"
TEMPLATE_PARAM = "chat_template_kwargs.chat_template"


def _error(r: httpx.Response, status: int, param=..., code=...) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:400])
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    e = body["error"]
    if param is not ...:
        assert e["param"] == param, e
    if code is not ...:
        assert e["code"] == code, e
    return e


@pytest.fixture(scope="module")
def apps():
    import ray
    from ray import serve

    from nanovllmx.serve import build_app

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="serve")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = {"device": "cpu", "context_len": CTX, "max_bs": 4, "ray_actor_options": {"num_cpus": 1}}
    folder = str(demo_model_path())
    serve.run(
        build_app({"model": folder, "served_model_name": "plain-model", **base}), name="plain", route_prefix="/plain"
    )
    serve.run(
        build_app(
            {
                "model": DEMO_MODEL_NAME,
                "trust_request_chat_template": True,
                "chat_template_timeout_s": BUDGET_S,
                "prompt_job_stuck_after_s": STUCK_AFTER_S,
                "api_key": KEY,
                # Serve's own health check would replace the replica during the stuck window on purpose
                # made below; /health (the same check) is polled instead
                "health_check_period_s": 600,
                **base,
            }
        ),
        name="guarded",
        route_prefix="/guarded",
    )
    url = f"http://127.0.0.1:{port}"
    plain = httpx.Client(base_url=url + "/plain", timeout=120)
    guarded = httpx.Client(base_url=url + "/guarded", timeout=120)
    try:
        yield plain, guarded, folder
    finally:
        plain.close()
        guarded.close()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _chat_ok(c: httpx.Client, headers: dict | None = None, **extra) -> dict:
    r = c.post("/v1/chat/completions", json={**CHAT, **extra}, headers=headers)
    assert r.status_code == 200, r.text[:400]
    assert r.json()["usage"]["completion_tokens"] == 3
    return r.json()


# ====================================================================== client chat templates
def test_client_chat_template_refused_by_default(apps):
    plain, _, _ = apps
    for template in ("{{ 'hello' }}", NESTED_LOOPS):
        t = time.perf_counter()
        r = plain.post("/v1/chat/completions", json={**CHAT, "chat_template_kwargs": {"chat_template": template}})
        took = time.perf_counter() - t
        e = _error(r, 400, TEMPLATE_PARAM, "chat_template_not_allowed")
        assert TEMPLATE_PARAM in e["message"] and took < 5, (e, took)
        print(f"\nclient template refused (trust off) in {took:.3f} s")
    # the other chat_template_kwargs keep working
    _chat_ok(plain, chat_template_kwargs={"enable_thinking": False})
    _error(
        plain.post("/v1/chat/completions", json={**CHAT, "chat_template_kwargs": {"tokenize": True}}),
        400,
        "chat_template_kwargs",
    )


def test_trusted_client_template_stops_within_its_budget_and_health_reports_it(apps):
    _, guarded, _ = apps
    # a harmless client template renders (trusted), in Jinja's sandbox: no attribute escapes
    _chat_ok(guarded, AUTH, chat_template_kwargs={"chat_template": "{{ messages[0]['content'] }}"})
    r = guarded.post(
        "/v1/chat/completions",
        json={**CHAT, "chat_template_kwargs": {"chat_template": "{{ ''.__class__.__mro__ }}"}},
        headers=AUTH,
    )
    _error(r, 400, TEMPLATE_PARAM, "invalid_messages")
    assert guarded.get("/health").status_code == 200

    # six hostile renders at once (the attack that hung a replica for good), /health polled meanwhile
    health: list[tuple[float, int, str | None]] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=str(guarded.base_url), timeout=30) as c:
            while not done.is_set():
                t = time.perf_counter()
                h = c.get("/health")
                health.append((t, h.status_code, h.json().get("error", {}).get("code") if h.content else None))
                time.sleep(0.1)

    def hostile(_: int) -> tuple[httpx.Response, float]:
        t = time.perf_counter()
        with httpx.Client(base_url=str(guarded.base_url), timeout=120) as c:
            r = c.post(
                "/v1/chat/completions",
                json={**CHAT, "chat_template_kwargs": {"chat_template": NESTED_LOOPS}},
                headers=AUTH,
            )
        return r, time.perf_counter() - t

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(6) as ex:
        results = list(ex.map(hostile, range(6)))
    time.sleep(0.3)
    done.set()
    poller.join(30)
    times = [took for _, took in results]
    for r, _ in results:
        e = _error(r, 400, TEMPLATE_PARAM, "chat_template_timeout")
        assert "more than 2 s" in e["message"], e
    assert max(times) < BUDGET_S + 8, times  # the budget plus the proxy, under a busy shared CPU
    # while the renders ran past prompt_job_stuck_after_s, /health said so (503), and is 200 again after
    codes = [(round(t - t0, 2), s, c) for t, s, c in health]
    assert any(s == 503 and c == "prompt_workers_stuck" for _, s, c in codes), codes
    assert codes[-1][1] == 200, codes
    print(f"\n6 nested-loop templates: 400 after {min(times):.2f}-{max(times):.2f} s; /health: {codes}")
    # the service answers a normal request right after
    t = time.perf_counter()
    _chat_ok(guarded, AUTH)
    print(f"normal chat request right after: {time.perf_counter() - t:.2f} s")


def test_prompt_jobs_tracker_with_a_fake_clock():
    from nanovllmx.serve.prompt_jobs import PromptJobs

    now = [100.0]
    jobs = PromptJobs(max_workers=2, clock=lambda: now[0])
    started, release = threading.Event(), threading.Event()

    def stuck_render() -> str:
        started.set()
        release.wait(30)
        return "rendered"

    try:
        fut = jobs.executor.submit(jobs.timed, stuck_render)
        assert started.wait(10)
        assert jobs.running() == [0.0] and jobs.stuck(60) is None
        now[0] += 61
        msg = jobs.stuck(60)
        assert msg is not None and "1 prompt job(s)" in msg and "61 s" in msg, msg
        release.set()
        assert fut.result(10) == "rendered"
        assert jobs.running() == [] and jobs.stuck(60) is None
    finally:
        release.set()
        jobs.shutdown()


def test_deadline_stops_a_render_in_this_thread_only():
    from nanovllmx.serve.prompt_jobs import RenderTimeout, call_with_deadline

    def spin() -> None:
        while True:
            pass

    t = time.perf_counter()
    with pytest.raises(RenderTimeout):
        call_with_deadline(0.3, spin)
    assert time.perf_counter() - t < 2
    import sys

    assert sys.gettrace() is None or "tracer" not in repr(sys.gettrace())
    assert call_with_deadline(5, sum, [1, 2]) == 3


# ============================================================================ /v1/models
def test_models_do_not_show_the_local_checkpoint_path(apps):
    plain, guarded, folder = apps
    for r in (plain.get("/v1/models"), plain.get("/v1/models/plain-model")):
        assert r.status_code == 200, r.text
        assert folder not in r.text, r.text
        cards = r.json().get("data") or [r.json()]
        assert all(c["root"] == "plain-model" for c in cards), cards
    assert guarded.get("/v1/models", headers=AUTH).json()["data"][0]["root"] == DEMO_MODEL_NAME


# ============================================================================ API key
PROTECTED = [
    ("GET", "/v1/models", None),
    ("GET", f"/v1/models/{DEMO_MODEL_NAME}", None),
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
    ("GET", "/v1/engine/stats", None),
    ("GET", "/openapi.json", None),
    ("GET", "/docs", None),
    ("GET", "/redoc", None),
]


def test_api_key(apps):
    plain, guarded, _ = apps
    for method, path, body in PROTECTED:
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": KEY}, {"Authorization": "Basic x"}):
            r = guarded.request(method, path, json=body, headers=headers)
            e = _error(r, 401, None, "invalid_api_key")
            assert e["type"] == "invalid_request_error" and KEY not in r.text, (path, headers, e)
            assert r.headers.get("www-authenticate") == "Bearer"
        r = guarded.request(method, path, json=body, headers=AUTH)
        assert r.status_code == 200, (path, r.status_code, r.text[:300])
        assert plain.request(method, path.replace(DEMO_MODEL_NAME, "plain-model"), json=body).status_code == 200
    assert guarded.get("/health").status_code == 200  # open: load balancers and Serve probe it
    # the openai SDK sends the key as a bearer token
    url = str(guarded.base_url).rstrip("/") + "/v1"
    ok = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0).chat.completions.create(
        model=DEMO_MODEL_NAME, messages=CHAT["messages"], max_tokens=2
    )
    assert ok.usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError) as exc:
        openai.OpenAI(base_url=url, api_key="sk-wrong", max_retries=0).models.list()
    assert exc.value.code == "invalid_api_key"
    # the key is never written to a log
    from ray._private import worker

    logs = Path(worker._global_node.get_session_dir_path()) / "logs"
    for f in logs.rglob("*"):
        if f.is_file() and f.stat().st_size < 50_000_000:
            assert KEY.encode() not in f.read_bytes(), f


def test_api_key_options(monkeypatch):
    from nanovllmx.entrypoints.openai import api_server
    from nanovllmx.serve import build_app

    def init_kwargs(args: dict) -> dict:
        return build_app({"model": DEMO_MODEL_NAME, "device": "cpu", **args})._bound_deployment.init_kwargs

    monkeypatch.delenv("NANOVLLMX_API_KEY", raising=False)
    kw = init_kwargs({})
    assert kw["api_key"] is None and kw["trust_request_chat_template"] is False
    assert kw["chat_template_timeout_s"] == 5 and kw["prompt_job_stuck_after_s"] == 60
    monkeypatch.setenv("NANOVLLMX_API_KEY", "from-env")
    assert init_kwargs({})["api_key"] == "from-env"
    assert init_kwargs({"api_key": "given"})["api_key"] == "given"
    assert init_kwargs({"trust_request_chat_template": "true"})["trust_request_chat_template"] is True
    for bad in (
        {"chat_template_timeout_s": 0},
        {"prompt_job_stuck_after_s": "soon"},
        {"trust_request_chat_template": 2},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            init_kwargs(bad)
    ns = api_server.parse_args(["--model", DEMO_MODEL_NAME])
    assert ns.host == "127.0.0.1"
    args = api_server.app_args(
        api_server.parse_args(
            [
                "--model",
                DEMO_MODEL_NAME,
                "--api-key",
                "k",
                "--trust-request-chat-template",
                "--chat-template-timeout",
                "3",
            ]
        )
    )
    assert (
        args["api_key"] == "k" and args["trust_request_chat_template"] is True and args["chat_template_timeout_s"] == 3
    )


# ============================================================================ per-request bounds
def test_65_stop_strings_refused(apps):
    plain, _, _ = apps
    r = plain.post("/v1/chat/completions", json={**CHAT, "stop": [f"s{i}" for i in range(65)]})
    _error(r, 400, "stop")
    _chat_ok(plain, stop=[f"s{i}" for i in range(4)])


def test_8mb_prompt_refused_fast_while_small_requests_work(apps):
    plain, _, _ = apps
    from nanovllmx.serve.middleware import DEFAULT_MAX_REQUEST_BODY_BYTES

    prompt = "llama " * 1_316_000  # 7.9 MB of text, under the 8 MiB body limit with its JSON
    body = {"prompt": prompt, "max_tokens": 2}
    import json

    size = len(json.dumps(body))
    assert 7_800_000 < size < DEFAULT_MAX_REQUEST_BODY_BYTES, size
    took = []
    for _ in range(3):
        t = time.perf_counter()
        r = plain.post("/v1/completions", json=body)
        took.append(time.perf_counter() - t)
        _error(r, 400, "prompt", "context_length_exceeded")
    print(f"\n{size / 1e6:.1f} MB prompt: 400 context_length_exceeded in {[round(x, 3) for x in took]} s")
    assert min(took) < 1.0, took
    with cf.ThreadPoolExecutor(2) as ex:  # a small request is answered while the big ones are refused
        big = ex.submit(lambda: httpx.post(str(plain.base_url).rstrip("/") + "/v1/completions", json=body, timeout=60))
        t = time.perf_counter()
        _chat_ok(plain)
        small = time.perf_counter() - t
        assert big.result().status_code == 400
    print(f"small chat request alongside: {small:.2f} s")
