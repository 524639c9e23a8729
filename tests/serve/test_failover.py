"""Issue 19, items 3-4: actor deaths and drains under a Serve deployment (CPU, executor ray).

- a dead worker / scheduler actor: /health and Serve's health check fail at once; requests in the
  meantime get OpenAI's 503 `engine_unavailable` + Retry-After, with no address, PID or actor id in
  the body; Serve replaces the replica (build_app's defaults: a check every 2 s, 3 failures) and a
  request succeeds again;
- a redeploy drains the old replica: a stream in flight runs to its end, no request fails.
The SIGTERM drain of the api_server is in test_reliability.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import httpx
import pytest

from tests.serve.test_reliability import (  # noqa: F401 - fixtures
    Server,
    _deploy,
    _is_openai_error,
    ray_instance,
    ray_procs,
    serve_url,
)

ray = pytest.importorskip("ray")

IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")
ACTOR_ID = re.compile(r"\b[0-9a-f]{24,}\b")  # Ray actor / node / job ids are long hex strings
LEAKS = (IPV4, re.compile(r"pid=|\bpid\b", re.I), ACTOR_ID, re.compile(r"namespace|ray::|Actor", re.I))


def _no_internals(text: str) -> None:
    for pat in LEAKS:
        assert not pat.search(text), f"{pat.pattern} in {text!r}"


def _check_unavailable(r: httpx.Response) -> None:
    """OpenAI's 503 engine_unavailable with Retry-After, naming its request id (the X-Request-ID header)."""
    e = _is_openai_error(r, 503, None, "engine_unavailable")
    assert e["type"] == "server_error" and int(r.headers["retry-after"]) >= 1, (e, r.headers)
    rid = r.headers.get("x-request-id")
    assert rid and rid in e["message"], (rid, e)
    _no_internals(r.text.replace(rid, "RID"))


def _recover(srv: Server, kill, what: str) -> float:
    """kill() the engine's actor, then poll: each answer is a 200 (a new replica) or the 503 above;
    returns the seconds from the kill to the first 200."""
    old = srv.stats()["replica"]
    t_kill = time.monotonic()
    kill()
    # the replica notices at once: /health fails now (Serve's health check calls the same check)
    deadline = time.monotonic() + 30
    while (h := srv.http.get("/health")).status_code == 200:
        assert time.monotonic() < deadline, "/health still 200 after the kill"
        time.sleep(0.2)
    t_unhealthy = time.monotonic() - t_kill
    if h.status_code == 503 and h.headers.get("content-type", "").startswith("application/json"):
        _check_unavailable(h)
    n503 = 0
    deadline = time.monotonic() + 120
    while True:
        r = srv.http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "ignore_eos": True}, timeout=60)
        if r.status_code == 200:
            break
        _check_unavailable(r)  # never a 500, never internals
        n503 += 1
        assert time.monotonic() < deadline, "no healthy replica after 120s"
        time.sleep(0.3)
    took = time.monotonic() - t_kill
    assert r.json()["usage"]["completion_tokens"] == 3
    assert srv.stats()["replica"] != old
    print(
        f"{what}: /health 503 after {t_unhealthy:.2f}s, {n503} x 503 engine_unavailable, served again after {took:.1f}s"
    )
    assert took < 60, took
    return took


def test_actor_deaths_give_503_and_serve_replaces_the_replica(serve_url):  # noqa: F811
    from ray import serve

    before = set(ray_procs("ray::WorkerActor")) | set(ray_procs("ray::SchedulerActor"))
    srv = _deploy(serve_url, "failover", executor="ray", max_bs=4)  # build_app's health check defaults
    try:
        # 1. a worker actor dies while a non-streaming request runs: it gets the 503 (nothing reached
        # the client), and so do the requests until Serve has replaced the replica
        (worker,) = set(ray_procs("ray::WorkerActor")) - before
        result: dict = {}
        started = threading.Event()

        def blocking():
            started.set()
            result["r"] = httpx.post(
                srv.url + "/v1/completions",
                json={"prompt": "Go on.", "max_tokens": 200, "ignore_eos": True},
                timeout=60,
            )

        t = threading.Thread(target=blocking)
        t.start()
        assert started.wait(10)
        deadline = time.monotonic() + 30
        while srv.stats()["num_running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        _recover(srv, lambda: os.kill(worker, signal.SIGKILL), "worker actor SIGKILLed")
        t.join(60)
        _check_unavailable(result["r"])

        # 2. the new replica's scheduler actor dies, idle: refused at submission with the same 503
        now = set(ray_procs("ray::SchedulerActor")) - before
        deadline = time.monotonic() + 30
        while len(now) != 1:  # the old replica's actors are going
            assert time.monotonic() < deadline, now
            time.sleep(0.2)
            now = set(ray_procs("ray::SchedulerActor")) - before
        (sched,) = now
        _recover(srv, lambda: os.kill(sched, signal.SIGKILL), "scheduler actor SIGKILLed")
        assert srv.http.get("/health").status_code == 200
    finally:
        srv.http.close()
        serve.delete("failover")


def test_redeploy_drains_a_stream_in_flight(serve_url):  # noqa: F811
    """A redeploy removes the old replica: Serve routes new requests to the new one and waits for the
    old one's requests before __del__ stops its engine. The stream in flight ends with its last token
    and [DONE]; no request made meanwhile fails (Serve routes nothing to a draining replica)."""
    from ray import serve

    srv = _deploy(serve_url, "drain", max_bs=4)
    try:
        old = srv.stats()["replica"]
        started, result = threading.Event(), {}

        def streaming():
            body = {"prompt": "Once", "max_tokens": 200, "ignore_eos": True, "stream": True}
            with httpx.Client(timeout=300) as c, c.stream("POST", srv.url + "/v1/completions", json=body) as r:
                lines = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
                        started.set()
                result["stream"] = (r.status_code, lines)

        t = threading.Thread(target=streaming)
        t.start()
        assert started.wait(60)
        t0 = time.monotonic()
        done = threading.Event()

        def redeploy():
            _deploy(serve_url, "drain", max_bs=4, seed=1)  # new args: a new replica, the old one drains
            done.set()

        rt = threading.Thread(target=redeploy)
        rt.start()
        statuses = []
        while not done.is_set() or t.is_alive():
            r = srv.http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=120)
            statuses.append(r.status_code)
            assert r.status_code == 200, r.text[:300]
            time.sleep(0.5)
            assert time.monotonic() - t0 < 240
        rt.join(10)
        t.join(10)
        status, lines = result["stream"]
        assert status == 200 and lines[-1] == "data: [DONE]", lines[-3:]
        last = json.loads(lines[-2][6:])
        assert last["choices"][0]["finish_reason"] == "length", last
        assert srv.stats()["replica"] != old
        print(
            f"redeploy: stream of 200 tokens completed; {len(statuses)} requests during it, all 200; "
            f"{time.monotonic() - t0:.1f}s"
        )
    finally:
        srv.http.close()
        serve.delete("drain")
