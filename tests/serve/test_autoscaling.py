"""Autoscaling with gang placement drops nothing (issue 20): load takes the app from 1 replica to 2
and, once it falls, back to 1, on CPU with the engine on Ray (executor "ray": each replica one
placement group, the replica + a scheduler actor + a worker actor). Every request sent completes
(all its tokens, then [DONE]): while Serve takes a replica down it stops routing to it and lets its
streams finish (graceful_shutdown_timeout_s), and new requests go to the other one.

Serve's autoscaling metrics are pushed every 10 s by default; the module's Ray instance pushes them
every 0.5 s (RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S, read by the controller, proxy and
replicas) so the test takes about a minute.
"""

from __future__ import annotations

import json
import os
import threading
import time

import httpx
import pytest

from nanovllmx.utils.demo import DEMO_MODEL_NAME
from tests.helpers import free_port

pytestmark = pytest.mark.timeout(300)

ray = pytest.importorskip("ray")

ENV = {
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
}
APP = "auto"


@pytest.fixture(scope="module")
def serve_url():
    from ray import serve

    if ray.is_initialized():
        ray.shutdown()
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)  # inherited by the Serve controller, proxy and replicas
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="serve")
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


class Load:
    """Client threads, each sending streamed completions back to back; counts every outcome."""

    def __init__(self, url: str):
        self.url = url
        self.lock = threading.Lock()
        self.sent = self.completed = 0
        self.failures: list[str] = []
        self.threads: list[tuple[threading.Thread, threading.Event]] = []

    def one(self, http: httpx.Client, max_tokens: int) -> None:
        with self.lock:
            self.sent += 1
        body = {"prompt": "Count to a hundred:", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        try:
            with http.stream("POST", "/v1/completions", json=body) as r:
                lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
                status = r.status_code
            ok = status == 200 and lines and lines[-1] == "data: [DONE]"
            chunks = [json.loads(ln[6:]) for ln in lines[:-1]] if ok else []
            errors = [c for c in chunks if "error" in c]
            if not ok or errors or not chunks or chunks[-1]["choices"][0]["finish_reason"] != "length":
                raise AssertionError(f"status {status}, {len(lines)} events, errors {errors}, last {lines[-2:]}")
        except Exception as e:  # noqa: BLE001 - every failure is counted and reported
            with self.lock:
                self.failures.append(f"{type(e).__name__}: {e}")
            return
        with self.lock:
            self.completed += 1

    @property
    def in_flight(self) -> int:
        with self.lock:
            return self.sent - self.completed - len(self.failures)

    def add(self, n: int, max_tokens: int) -> None:
        for _ in range(n):
            stop = threading.Event()

            def loop(stop: threading.Event = stop) -> None:
                with httpx.Client(base_url=self.url, timeout=120) as http:
                    while not stop.is_set():
                        self.one(http, max_tokens)

            t = threading.Thread(target=loop, daemon=True)
            t.start()
            self.threads.append((t, stop))

    def remove(self, n: int) -> None:
        """Stop n clients after their current request (it still counts)."""
        for _, stop in self.threads[:n]:
            stop.set()
        for t, _ in self.threads[:n]:
            t.join(120)
            assert not t.is_alive(), "a client hangs"
        self.threads = self.threads[n:]


def _replicas() -> dict[str, int]:
    from ray import serve

    app = serve.status().applications.get(APP)
    dep = app.deployments.get("LLMServer") if app else None
    return {str(k).split(".")[-1]: v for k, v in (dep.replica_states if dep else {}).items()}


def _wait_for(pred, what: str, timeout: float, history: list, origin: float) -> float:
    """Poll serve.status() until pred(replica states); history gets (seconds since origin, states)
    at every change. Returns the seconds since origin."""
    t0 = time.monotonic()
    while True:
        states = _replicas()
        if not history or history[-1][1] != states:
            history.append((round(time.monotonic() - origin, 1), states))
        if pred(states):
            return time.monotonic() - origin
        assert time.monotonic() - t0 < timeout, f"{what}: not after {timeout}s; replica states {history}"
        time.sleep(0.25)


def test_autoscaling_up_and_down_drops_nothing(serve_url):
    from ray import serve

    from nanovllmx.serve import build_app

    app = build_app(
        {
            "model": DEMO_MODEL_NAME,
            "device": "cpu",
            "executor": "ray",  # the grid (one shard) in the replica's placement group
            "context_len": 256,
            "max_bs": 4,
            "ray_actor_options": {"num_cpus": 0.5},
            "autoscaling_config": {
                "min_replicas": 1,
                "max_replicas": 2,
                "target_ongoing_requests": 2,
                "upscale_delay_s": 1,
                "downscale_delay_s": 3,
                "look_back_period_s": 2,
            },
        }
    )
    t_start = time.monotonic()
    serve.run(app, name=APP, route_prefix=f"/{APP}")
    url = f"{serve_url}/{APP}"
    history: list = []
    assert _replicas() == {"RUNNING": 1}
    from ray.util import placement_group_table

    load = Load(url)
    try:
        t_load = time.monotonic()
        load.add(6, max_tokens=16)  # ~6 ongoing requests against a target of 2 per replica: 2 replicas
        up = _wait_for(lambda s: s.get("RUNNING", 0) == 2, "upscale to 2 replicas", 150, history, t_load)
        groups = [g for g in placement_group_table().values() if g["state"] == "CREATED"]
        assert len(groups) == 2, groups  # one per replica, nothing else
        time.sleep(3)  # both serve
        # the load falls to 2 clients streaming longer answers (1 replica's worth): Serve's router
        # spreads them over both replicas, so the one it stops has a stream in flight
        load.add(2, max_tokens=64)
        load.remove(6)
        t_fall = time.monotonic()
        _wait_for(lambda s: "STOPPING" in s or s == {"RUNNING": 1}, "a replica stopping", 150, history, t_load)
        in_flight = load.in_flight
        down = _wait_for(lambda s: s == {"RUNNING": 1}, "downscale to 1 replica", 150, history, t_load)
        down -= t_fall - t_load
        time.sleep(2)  # requests keep going to the replica left
        load.remove(2)
    finally:
        for _, stop in load.threads:
            stop.set()
        for t, _ in load.threads:
            t.join(120)
    took = time.monotonic() - t_start
    print(
        f"autoscaling: up to 2 replicas {up:.1f}s after the load began, back to 1 {down:.1f}s after it fell; "
        f"{load.sent} requests sent, {load.completed} completed, {len(load.failures)} failed, {in_flight} in flight "
        f"when a replica began stopping; {took:.0f}s in all; "
        f"replica states (s since the load began) {history}"
    )
    assert not load.failures, load.failures[:5]
    assert load.sent == load.completed > 0
    assert in_flight >= 1
    counts = [s.get("RUNNING", 0) for _, s in history]
    assert 2 in counts and counts[-1] == 1 and counts.index(2) < len(counts) - 1
    groups = [g for g in placement_group_table().values() if g["state"] == "CREATED"]
    assert len(groups) == 1, groups  # the stopped replica's group went with it
    serve.delete(APP)
