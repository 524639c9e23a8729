"""Observability: the app's Ray metrics, read back from Ray's Prometheus export, and the log lines.

The module fixture starts its own Ray instance with a known metrics export port and a short report
interval (metrics reach the export within ~1 s instead of Ray's default 10 s), serves the demo
model through the real app, drives requests with httpx, and polls `/metrics` until the expected
values show up (or a deadline passes). Ray and Serve are shut down at the end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from types import SimpleNamespace

import httpx
import pytest

from nanovllmx.utils.demo import DEMO_MODEL_NAME
from tests.helpers import free_port

pytestmark = pytest.mark.timeout(300)

MODEL = "metrics-demo"
CONTEXT_LEN = 512
LONG_SYSTEM = " ".join(f"Rule {i}: answer briefly and never mention llamas." for i in range(25))
_SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SERIES.match(line)
        if m:
            out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return out


class Env:
    def __init__(self, url: str, metrics_url: str):
        self.url, self.metrics_url = url, metrics_url
        self.http = httpx.Client(base_url=url, timeout=120)

    def scrape(self) -> list[tuple[str, dict[str, str], float]]:
        try:
            return parse_prometheus(httpx.get(self.metrics_url, timeout=10).text)
        except httpx.HTTPError:
            return []

    def value(self, name: str, series=None, **labels) -> float:
        """Sum over the series of `name` (this app's model) whose labels include `labels`."""
        series = self.scrape() if series is None else series
        labels = {"model_name": MODEL, **labels}
        return sum(v for n, lab, v in series if n == name and all(lab.get(k) == x for k, x in labels.items()))

    def has(self, name: str, series) -> bool:
        return any(n == name and lab.get("model_name") == MODEL for n, lab, _ in series)

    def wait_for(self, check, what: str, timeout: float = 60.0):
        """Poll the export until check(series) is true."""
        deadline = time.monotonic() + timeout
        while True:
            series = self.scrape()
            if check(series):
                return series
            if time.monotonic() > deadline:
                names = sorted({n for n, lab, _ in series if n.startswith("ray_nanovllmx")})
                pytest.fail(f"metrics never showed {what} within {timeout}s; nanovllmx series: {names}")
            time.sleep(0.25)

    def chat(self, content: str, system: str | None = None, **kw) -> httpx.Response:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        body = {"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0, "ignore_eos": True, **kw}
        return self.http.post("/v1/chat/completions", json=body)


@pytest.fixture(scope="module")
def env():
    import ray
    from ray import serve

    from nanovllmx.serve import build_app

    if ray.is_initialized():  # another module left Ray up: ours needs its own metrics settings
        serve.shutdown()
        ray.shutdown()
    mport = free_port()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        namespace="metrics",
        _metrics_export_port=mport,
        _system_config={"metrics_report_interval_ms": 500},
    )
    assert ray._private.worker.global_worker.node.metrics_export_port == mport
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app(
            {
                "model": DEMO_MODEL_NAME,
                "served_model_name": MODEL,
                "context_len": CONTEXT_LEN,
                "max_bs": 8,
                "device": "cpu",
            }
        ),
        name="test-metrics",
        route_prefix="/",
    )
    e = Env(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{mport}/metrics")
    try:
        yield e
    finally:
        e.http.close()
        serve.shutdown()
        ray.shutdown()


# ============================================================================== through the app
def test_engine_gauges_appear(env):
    """The poller sets the engine gauges within a second or two of the replica starting."""
    series = env.wait_for(lambda s: env.value("ray_nanovllmx_kv_cache_slots", s) > 0, "kv_cache_slots")
    for name in (
        "ray_nanovllmx_num_requests_running",
        "ray_nanovllmx_num_requests_waiting",
        "ray_nanovllmx_num_requests_preempted",
        "ray_nanovllmx_kv_cache_usage",
        "ray_nanovllmx_kv_cache_cached_usage",
        "ray_nanovllmx_prefix_cache_hit_rate",
    ):
        assert env.has(name, series), name
    assert 0 <= env.value("ray_nanovllmx_kv_cache_usage", series) <= 1


def test_repeated_prefix_raises_cached_token_counter(env):
    base = env.scrape()
    cached0 = env.value("ray_nanovllmx_cached_prompt_tokens_total", base)
    prompt0 = env.value("ray_nanovllmx_prompt_tokens_total", base)
    gen0 = env.value("ray_nanovllmx_generation_tokens_total", base)
    usages = []
    for q in ("What is one plus one?", "Name a colour."):
        r = env.chat(q, system=LONG_SYSTEM)
        assert r.status_code == 200, r.text
        usages.append(r.json()["usage"])
    cached = usages[1]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 200, usages  # the second request reused the long system prompt
    prompts = sum(u["prompt_tokens"] for u in usages)
    series = env.wait_for(
        lambda s: (
            env.value("ray_nanovllmx_cached_prompt_tokens_total", s) - cached0 >= cached
            and env.value("ray_nanovllmx_prompt_tokens_total", s) - prompt0 >= prompts
            and env.value("ray_nanovllmx_generation_tokens_total", s) - gen0 >= 8
        ),
        "the prompt / cached / generation token counters advancing",
    )
    assert env.value("ray_nanovllmx_prefix_cache_hit_rate", series) > 0


def test_finished_requests_counted_by_reason(env):
    def reasons(s):
        return {r: env.value("ray_nanovllmx_requests_finished_total", s, finish_reason=r) for r in ("length", "abort")}

    before = reasons(env.scrape())
    r = env.chat("Say something.", max_tokens=3)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    # an aborted stream: close it after the first content chunk
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Talk for a long time."}],
        "max_tokens": 300,
        "ignore_eos": True,
        "stream": True,
    }
    with env.http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        n = 0
        for line in resp.iter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                n += 1
                if n >= 2:
                    break
    env.wait_for(
        lambda s: reasons(s)["length"] >= before["length"] + 1 and reasons(s)["abort"] >= before["abort"] + 1,
        "requests_finished{finish_reason=length} and {finish_reason=abort} increments",
    )


def test_http_status_counter(env):
    route = "/v1/chat/completions"

    def count(s, status):
        return env.value("ray_nanovllmx_http_requests_total", s, status=status, route=route)

    base = env.scrape()
    b400, b200 = count(base, "400"), count(base, "200")
    r = env.chat("hi", temperature=-1)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = env.http.post(route, content=b"{not json")
    assert r.status_code == 400
    assert env.chat("hi").status_code == 200
    assert env.http.get("/no/such/route").status_code == 404
    env.wait_for(
        lambda s: (
            count(s, "400") >= b400 + 2
            and count(s, "200") >= b200 + 1
            and env.value("ray_nanovllmx_http_requests_total", s, status="404", route="other") >= 1
        ),
        "http_requests{status=400} +2, {status=200} +1, {status=404,route=other}",
    )


def test_latency_histograms_count_requests(env):
    names = (
        "ray_nanovllmx_time_to_first_token_seconds_count",
        "ray_nanovllmx_inter_token_latency_seconds_count",
        "ray_nanovllmx_e2e_request_latency_seconds_count",
        "ray_nanovllmx_request_queue_time_seconds_count",
    )
    base = env.scrape()
    before = {n: env.value(n, base) for n in names}
    # streaming and not: both go through the same EngineStream
    assert env.chat("One.", max_tokens=5).status_code == 200
    with env.http.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Two."}],
            "max_tokens": 5,
            "ignore_eos": True,
            "stream": True,
        },
    ) as resp:
        assert resp.status_code == 200
        assert [x for x in resp.iter_lines() if x][-1] == "data: [DONE]"
    series = env.wait_for(
        lambda s: (
            env.value(names[0], s) >= before[names[0]] + 2
            and env.value(names[2], s) >= before[names[2]] + 2
            and env.value(names[3], s) >= before[names[3]] + 2
            and env.value(names[1], s) >= before[names[1]] + 2 * 4
        ),  # 5 tokens: 4 gaps each
        "TTFT / e2e / queue-time counts +2 and ITL count +8",
    )
    # buckets are cumulative and end with +Inf == count
    inf = env.value("ray_nanovllmx_time_to_first_token_seconds_bucket", series, le="+Inf")
    assert inf == env.value(names[0], series)
    assert env.value("ray_nanovllmx_time_to_first_token_seconds_sum", series) > 0


# ============================================================================== logging (no Ray)
def _capture(caplog):
    root = logging.getLogger("nanovllmx")
    if not root.propagate:  # the replica's logging setup turned propagation to the root logger off
        root.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="nanovllmx")
    return root


def test_one_log_line_per_finished_request(caplog):
    from nanovllmx.outputs import StreamDelta
    from nanovllmx.serve.streaming import EngineStream

    class FakeServer:
        metrics = None
        num_aborted = 0

    async def deltas():
        for i in range(1, 4):
            yield StreamDelta("req-x", [7], "a", i == 3, "length" if i == 3 else None, 10, 6, i, 0.002)

    async def run():
        agen = deltas()  # EngineStream reads a RequestStream: its request_id and __anext__
        stream = SimpleNamespace(request_id="req-x", __anext__=agen.__anext__)
        return [d async for d in EngineStream(FakeServer(), stream, 10)]

    root = _capture(caplog)
    try:
        out = asyncio.run(run())
    finally:
        root.removeHandler(caplog.handler)
    assert len(out) == 3
    lines = [r.getMessage() for r in caplog.records if "req-x" in r.getMessage()]
    assert len(lines) == 1, lines
    assert re.search(
        r"request req-x length: prompt=10 cached=6 generated=3 ttft=\d+\.\d+s total=\d+\.\d+s "
        r"queue=0\.002s",
        lines[0],
    ), lines[0]


def test_inter_token_latency_is_per_token(monkeypatch):
    """A delta of 4 tokens 80 ms after the previous one: an inter-token latency of 20 ms, not 80.
    The app's clock (time.perf_counter) is a fake one here: no dependence on the machine's speed."""
    from nanovllmx.outputs import StreamDelta
    from nanovllmx.serve import streaming
    from nanovllmx.serve.streaming import EngineStream

    clock = [1000.0]
    monkeypatch.setattr(streaming.time, "perf_counter", lambda: clock[0])

    class Obs:
        def __init__(self):
            self.values = []

        def observe(self, v):
            self.values.append(v)

    class FakeServer:
        metrics = type("M", (), {"ttft": Obs(), "itl": Obs(), "queue_time": Obs()})()
        num_aborted = 0

        def request_done(self, *a, **k):
            pass

    async def deltas():
        yield StreamDelta("req-y", [7], "a", False, None, 10, 0, 1, 0.002)
        await asyncio.sleep(0)
        clock[0] += 0.08
        yield StreamDelta("req-y", [7, 8, 9, 10], "abcd", True, "length", 10, 0, 5)

    async def run():
        agen = deltas()  # EngineStream reads a RequestStream: its request_id and __anext__
        stream = SimpleNamespace(request_id="req-y", __anext__=agen.__anext__)
        return [d async for d in EngineStream(FakeServer(), stream, 10)]

    asyncio.run(run())
    (itl,) = FakeServer.metrics.itl.values
    assert itl == pytest.approx(0.02), itl


def test_engine_stats_line_only_while_busy(caplog):
    from nanovllmx.metrics import EngineStatsMonitor

    mon = EngineStatsMonitor(lambda: {}, None, log_interval=5.0)
    idle = {
        "num_running": 0,
        "num_waiting": 0,
        "num_slots": 1000,
        "free_slots": 1000,
        "cached_slots": 0,
        "prompt_tokens_total": 0,
        "cached_prompt_tokens_total": 0,
        "generation_tokens_total": 0,
        "num_preempted_total": 0,
        "num_preempted": 0,
    }
    root = _capture(caplog)
    try:
        lines = [mon.update(idle, t) for t in range(0, 12)]  # idle: nothing, ever
        assert lines == [None] * 12
        busy = dict(
            idle,
            num_running=2,
            free_slots=600,
            cached_slots=100,
            prompt_tokens_total=400,
            cached_prompt_tokens_total=100,
            generation_tokens_total=250,
        )
        lines = [mon.update(busy, 12 + t) for t in range(0, 6)]
        logged = [x for x in lines if x]
        assert len(logged) == 1, lines  # one line per 5 s window, not one per poll
        line = logged[0]
        assert "generation 50.0 tok/s" in line and "prompt 80.0 tok/s" in line, line
        assert "running 2, waiting 0" in line and "KV 30.0% used + 10.0% cached" in line, line
        assert "prefix hit 25.0%" in line, line
        # idle again: one more line for the window in which the work finished, then silence
        after = [mon.update(dict(busy, num_running=0, free_slots=900), 18 + t) for t in range(0, 15)]
        assert sum(1 for x in after if x) == 1, after
    finally:
        root.removeHandler(caplog.handler)
    assert sum("engine stats" in r.getMessage() for r in caplog.records) == 2


def test_metrics_disabled_without_ray(monkeypatch):
    """Offline (no Ray): no metrics objects, nothing recorded, the monitor still logs."""
    import ray

    from nanovllmx.metrics import EngineStatsMonitor, ServeMetrics

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert ServeMetrics.create("x") is None
    mon = EngineStatsMonitor(lambda: {}, None, log_interval=1.0)
    mon.update({"num_running": 1, "num_slots": 10, "free_slots": 5}, 0.0)
    assert mon.update({"num_running": 1, "num_slots": 10, "free_slots": 5}, 1.0) is not None


def test_grafana_dashboard_references_exported_names():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    dash = json.loads((root / "dashboards" / "nanovllmx_grafana.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
    for name in (
        "ray_nanovllmx_num_requests_running",
        "ray_nanovllmx_kv_cache_usage",
        "ray_nanovllmx_cached_prompt_tokens_total",
        "ray_nanovllmx_generation_tokens_total",
        "ray_nanovllmx_time_to_first_token_seconds_bucket",
        "ray_nanovllmx_inter_token_latency_seconds_bucket",
        "ray_nanovllmx_e2e_request_latency_seconds_bucket",
        "ray_nanovllmx_request_queue_time_seconds_bucket",
        "ray_nanovllmx_requests_finished_total",
        "ray_nanovllmx_http_requests_total",
    ):
        assert name in exprs, name
    doc = (root / "docs" / "observability.md").read_text()
    for name in re.findall(r"ray_nanovllmx_\w+", exprs):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert base in doc, f"{base} is used by the dashboard but not documented"
