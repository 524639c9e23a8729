"""Reliability (issue 7), on CPU with the tiny checkpoint: what the engine and the OpenAI app do when
things go wrong. docs/reliability.md maps every failure mode to its test here (fuzzing is in
tests/serve/test_fuzz.py).

- bad input: 4xx with OpenAI's error JSON, one log line each, the service keeps serving;
- overload: a bounded queue (`max_waiting_requests`), 503 + Retry-After beyond it; KV exhaustion
  preempts and every accepted request finishes;
- aborts: a request's slots are freed within one engine step;
- graceful shutdown: `LLM.shutdown(timeout)`, SIGTERM to the api_server (drains, leaves no process);
- failures: an exception inside a step, a killed Ray worker or scheduler actor (requests fail fast,
  nothing hangs, Serve replaces the unhealthy replica);
- a soak of mixed streaming / non-streaming requests with random disconnects leaks nothing.

The offline tests use the local engine; the rest share one Ray instance and one Serve instance
(shut down at the end of the module, so later modules start their own).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import glob
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from nanovllmx import LLM, EngineOverloadedError, EngineRequestError, EngineUnavailableError, SamplingParams
from nanovllmx.utils.demo import DEMO_MODEL_NAME
from tests.helpers import free_port, random_prompt, wait_api_server

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
CTX = 256


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def wait_idle(llm: LLM, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = llm.stats()
        if st["num_running"] == 0 and st["num_waiting"] == 0 and st["num_outstanding_requests"] == 0:
            assert st["free_slots"] + st["cached_slots"] == st["num_slots"], st
            return st
        assert time.monotonic() < deadline, f"engine not idle: {st}"
        time.sleep(0.02)


def within(seconds: float, fn, *args):
    """fn(*args) in a thread; fail (instead of hanging the suite) if it takes longer than `seconds`.
    Returns (result or raised exception, elapsed seconds)."""
    box: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["value"] = e
        box["elapsed"] = time.monotonic() - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{getattr(fn, '__name__', fn)} still running after {seconds}s: it hangs"
    return box["value"], box["elapsed"]


async def collect(agen) -> list | Exception:
    """All deltas of a stream, or the exception that ended it."""
    got = []
    try:
        async for d in agen:
            got.append(d)
    except Exception as e:  # noqa: BLE001
        return e
    return got


# ============================================================================ offline engine (local executor)
@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    engine = LLM(str(tiny_model_dir), context_len=CTX, max_bs=8, device="cpu")
    yield engine
    engine.shutdown()


def test_max_waiting_requests_config(tiny_model_dir):
    from nanovllmx.config import EngineConfig

    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="max_waiting_requests"):
            EngineConfig(model=str(tiny_model_dir), max_waiting_requests=bad)
    assert EngineConfig(model=str(tiny_model_dir)).max_waiting_requests == 4096
    assert issubclass(EngineOverloadedError, RuntimeError) and issubclass(EngineUnavailableError, RuntimeError)


def test_client_share_of_the_queue_bound(tiny_model_dir):
    """`clients=N` (Serve's N frontends of one engine): each admits ceil((max_bs + max_waiting) / N),
    so together they hold the engine's bound; the refusal says it is a share."""
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="clients must be"):  # before any engine starts
            LLM(str(tiny_model_dir), context_len=CTX, device="cpu", clients=bad)
    eng = LLM(str(tiny_model_dir), context_len=CTX, max_bs=2, max_waiting_requests=1, device="cpu", clients=2)
    try:
        assert eng.max_outstanding == 2  # ceil(3 / 2)

        async def main():
            streams = [eng.stream(random_prompt(20, seed=i), greedy(200), request_id=f"s{i}") for i in range(2)]
            tasks = [asyncio.ensure_future(collect(s)) for s in streams]
            await asyncio.sleep(0.05)
            with pytest.raises(EngineOverloadedError, match=r"2 requests outstanding here.*shared by 2 clients"):
                await eng.stream(random_prompt(5, seed=9), greedy(2)).__anext__()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        eng.shutdown()


def test_overload_refused_before_submission_and_waiting_abort(tiny_model_dir):
    """max_bs + max_waiting_requests requests outstanding: the next one raises EngineOverloadedError
    at once, without reaching the engine. A waiting request can be aborted; generate() of a batch
    larger than the queue is submitted as earlier requests finish."""
    eng = LLM(str(tiny_model_dir), context_len=CTX, max_bs=2, max_waiting_requests=1, device="cpu")
    try:
        assert eng.max_outstanding == 3

        async def main():
            streams = [eng.stream(random_prompt(20, seed=i), greedy(200), request_id=f"r{i}") for i in range(3)]
            tasks = [asyncio.ensure_future(collect(s)) for s in streams]
            await asyncio.sleep(0.05)  # all three submitted
            with pytest.raises(EngineOverloadedError, match=r"3 requests outstanding here.*=1 waiting\)"):
                await eng.stream(random_prompt(5, seed=9), greedy(2)).__anext__()
            st = eng.stats()
            assert st["num_outstanding_requests"] == 3 and st["num_running"] + st["num_waiting"] <= 3
            # the third waits for a place in the batch: abort it there
            deadline = time.monotonic() + 10
            while eng.stats()["num_waiting"] != 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            eng.abort("r2")
            waiting = await asyncio.wait_for(tasks[2], 30)
            assert waiting[-1].finished and waiting[-1].finish_reason == "abort" and waiting[-1].num_output_tokens == 0
            steps = eng.stats()["num_steps"]
            while (st := eng.stats())["num_waiting"]:  # the engine drops it before its next step
                assert st["num_steps"] - steps <= 2, st  # one snapshot: no steps counted after the drop
                await asyncio.sleep(0.001)
            for t in tasks[:2]:
                t.cancel()  # cancelling a consumer aborts its request
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run(asyncio.wait_for(main(), 60))
        wait_idle(eng)
        outs = eng.generate([random_prompt(8, seed=100 + i) for i in range(7)], greedy(3))
        assert [(len(o.token_ids), o.finish_reason) for o in outs] == [(3, "length")] * 7
        wait_idle(eng)
    finally:
        eng.shutdown()


def test_abort_frees_slots_within_one_engine_step(llm, monkeypatch):
    # the engine's step count when the abort is sent and when the scheduler frees the request:
    # recorded where they happen, so a slow poller cannot count steps that ran after the slots were freed
    core, marks = llm.core, {}
    real_send, real_free = core.abort, core.scheduler.abort

    def send(rid):
        marks.setdefault(("sent", rid), core.timer.steps)
        return real_send(rid)

    def free(rid):
        marks.setdefault(("freed", rid), core.timer.steps)
        return real_free(rid)

    monkeypatch.setattr(core, "abort", send)
    monkeypatch.setattr(core.scheduler, "abort", free)

    async def main():
        victim = llm.stream(random_prompt(30, seed=11), greedy(200), request_id="victim")
        other = asyncio.ensure_future(collect(llm.stream(random_prompt(30, seed=12), greedy(40))))
        n = 0
        async for _ in victim:
            n += 1
            if n == 3:
                llm.abort("victim")
                while llm.stats()["num_running"] != 1:  # the other one keeps the engine stepping
                    await asyncio.sleep(0.001)
        rest = await other
        return n, rest

    n, rest = asyncio.run(asyncio.wait_for(main(), 60))
    # the engine applies aborts before it launches its next step: at most the step being launched
    # when the abort was sent starts after it
    freed_after = marks[("freed", "victim")] - marks[("sent", "victim")]
    assert 0 <= freed_after <= 1, f"the aborted request still ran {freed_after} steps later"
    assert n <= 4  # its stream ended at once with the final "abort" delta
    assert rest[-1].finish_reason == "length" and rest[-1].num_output_tokens == 40
    wait_idle(llm)


def test_step_exception_fails_inflight_requests_and_loop_keeps_serving(llm, monkeypatch):
    probe = random_prompt(12, seed=21)
    before = llm.generate([probe], greedy(8))[0].token_ids
    worker = llm.core.executor.worker
    real = worker.execute_async
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 4:  # mid-generation: both requests are in flight
            raise RuntimeError("injected fault in the model")
        return real(batch)

    monkeypatch.setattr(worker, "execute_async", flaky)

    async def two():
        return await asyncio.gather(*(collect(llm.stream(random_prompt(15, seed=s), greedy(30))) for s in (22, 23)))

    t0 = time.monotonic()
    results = asyncio.run(asyncio.wait_for(two(), 120))
    assert time.monotonic() - t0 < 60  # failed, not hung (30 tokens take well under a second when idle)
    for r in results:
        assert isinstance(r, EngineRequestError), r
        assert "engine error: RuntimeError: injected fault in the model" in str(r)
    assert calls["n"] >= 4
    # the loop survived: same thread, same answers, nothing leaked
    assert llm.core._thread.is_alive()
    llm.check_health()  # raises EngineUnavailableError if the engine cannot serve
    assert llm.generate([probe], greedy(8))[0].token_ids == before
    wait_idle(llm)


def test_graceful_shutdown(tiny_model_dir):
    """shutdown(timeout): no new requests; short requests finish, long ones end with 'abort' at the
    timeout (generate returns them, streams get their final delta); everything is released.

    No race with the machine's speed: the engine's steps are gated so that the shutdown starts while
    all three requests are in one batch (the 6-token one cannot finish before that), and each step
    takes at least 40 ms, so the 240-token requests cannot finish within the 4 s timeout."""
    eng = LLM(str(tiny_model_dir), context_len=CTX, max_bs=4, device="cpu")
    worker = eng.core.executor.worker
    real = worker.execute_async
    submitted, all_in, release = threading.Event(), threading.Event(), threading.Event()

    def paced(batch):
        assert submitted.wait(60)  # no step before all three requests are submitted
        if batch.num_reqs == 3 and not all_in.is_set():
            all_in.set()  # sticky: the three are in one batch; hold it until the shutdown has begun
            assert release.wait(60)
        time.sleep(0.04)
        return real(batch)

    worker.execute_async = paced
    results: dict = {}

    def run_generate(name, n):
        try:
            results[name] = eng.generate([random_prompt(10, seed=len(name))], greedy(n))[0]
        except Exception as e:  # noqa: BLE001
            results[name] = e

    def run_stream():
        results["stream"] = asyncio.run(collect(eng.stream(random_prompt(10, seed=31), greedy(240))))

    threads = [
        threading.Thread(target=run_generate, args=("short", 6)),
        threading.Thread(target=run_generate, args=("long", 240)),
        threading.Thread(target=run_stream),
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60  # no step runs until `submitted`: the count cannot move past 3
    while eng.stats()["num_outstanding_requests"] < 3:
        assert time.monotonic() < deadline, eng.stats()
        time.sleep(0.01)
    submitted.set()
    assert all_in.wait(60), eng.stats()
    timeout = 4.0
    stopper = threading.Thread(target=eng.shutdown, kwargs={"timeout": timeout})
    t0 = time.monotonic()
    stopper.start()
    time.sleep(0.2)
    assert stopper.is_alive()  # draining (nothing can finish while the step is held)
    with pytest.raises(EngineUnavailableError, match="shut down"):  # refused at once while draining
        eng.generate(["Hello"], greedy(2))
    release.set()
    stopper.join(60)
    took = time.monotonic() - t0
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert timeout <= took < timeout + 30, took
    assert results["short"].finish_reason == "length" and len(results["short"].token_ids) == 6
    long = results["long"]
    assert long.finish_reason == "abort" and 0 < len(long.token_ids) < 240, long
    last = results["stream"][-1]
    assert last.finished and last.finish_reason == "abort" and 0 < last.num_output_tokens < 240

    async def new_stream():
        async for _ in eng.stream("Hello", greedy(2)):
            pass

    with pytest.raises(EngineUnavailableError):
        asyncio.run(new_stream())
    assert not eng.core._thread.is_alive() and not eng._out_thread.is_alive()
    assert eng.core.executor.worker.model is None and eng.core.executor.worker.kv is None  # memory released
    assert eng.stats()["num_outstanding_requests"] == 0
    eng.shutdown()  # idempotent


def test_llm_left_open_is_shut_down_at_exit(tiny_model_dir):
    """A script that never calls shutdown(): the interpreter's exit hooks stop the engine (its
    threads joined, its memory released) before the interpreter finalises; the hook keeps no LLM
    alive."""
    code = f"""
import atexit, gc, weakref
from nanovllmx import LLM
left_open = LLM({str(tiny_model_dir)!r}, context_len=64, max_bs=2, device="cpu")
closed = LLM({str(tiny_model_dir)!r}, context_len=64, max_bs=2, device="cpu")
closed.shutdown()
ref = weakref.ref(closed)
del closed
gc.collect()
assert ref() is None  # the exit hook does not keep an LLM alive
threads = (left_open.core._thread, left_open._out_thread)
assert all(t.is_alive() for t in threads)
atexit._run_exitfuncs()
assert not any(t.is_alive() for t in threads)
assert left_open.core.executor.worker.model is None
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


# ============================================================================ Ray: shared by the rest of the module
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_instance():
    if ray.is_initialized():
        ray.shutdown()
    # a fresh local instance (never a cluster another process runs); logical CPUs for 3 replicas + actors
    ray.init(address="local", num_cpus=8, include_dashboard=False, namespace="serve")
    try:
        yield
    finally:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()


def _raylet_pid() -> int:
    from ray._private import worker

    return worker._global_node.all_processes["raylet"][0].process.pid


def _proc_info(pid: int) -> tuple[str, int, int] | None:
    """(cmdline, ppid, rss bytes) of a live process, or None."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if fields.get("State", "").strip().startswith("Z"):
        return None  # a zombie: exited
    rss = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    return cmd, int(fields["PPid"]), rss


def ray_procs(prefix: str) -> list[int]:
    """PIDs of this Ray instance's worker processes whose title starts with `prefix` (e.g.
    "ray::WorkerActor", "ray::ServeReplica:main:"). Other Ray instances on the machine are ignored."""
    raylet = _raylet_pid()
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            info = _proc_info(int(d))
            if info and info[1] == raylet and info[0].startswith(prefix):
                out.append(int(d))
    return out


def _placement_groups_removed() -> bool:
    from ray.util import placement_group_table

    return all(pg["state"] == "REMOVED" for pg in placement_group_table().values())


def _kill_mid_generation(eng: LLM, kill) -> tuple[list, float]:
    """Two long streams; once both produce tokens, kill(); returns each stream's outcome and how long
    the failure took to reach them."""
    marks: dict = {}

    async def main():
        async def one(seed):
            got = []
            try:
                async for d in eng.stream(random_prompt(16, seed=seed), greedy(200)):
                    got.append(d)
                    if len(got) == 3:
                        marks[seed] = True
                        if len(marks) == 2:
                            marks["t_kill"] = time.monotonic()
                            kill()
            except Exception as e:  # noqa: BLE001
                marks.setdefault("t_failed", time.monotonic())
                return e
            return got

        return await asyncio.gather(one(41), one(42))

    outs = asyncio.run(asyncio.wait_for(main(), 60))
    return outs, marks["t_failed"] - marks["t_kill"]


def test_ray_worker_killed_mid_generation(ray_instance, tiny_model_dir):
    eng = LLM(str(tiny_model_dir), executor="ray", context_len=CTX, max_bs=4, device="cpu")
    actors = [eng.core.scheduler] + eng.core.workers
    try:
        eng.core.check_health()
        outs, delay = _kill_mid_generation(eng, lambda: ray.kill(eng.core.workers[0], no_restart=True))
        assert all(isinstance(o, EngineRequestError) for o in outs), outs
        print(f"in-flight requests failed {delay:.2f}s after the kill: {outs[0]}")
        assert delay < 30, f"the failure took {delay:.1f}s to reach the requests"
        with pytest.raises(EngineUnavailableError, match="broken"):
            eng.core.check_health()
        with pytest.raises(EngineUnavailableError, match="broken"):  # what the Serve replica's health check raises
            eng.check_health()
        # the next request fails fast too: never a hang
        err, elapsed = within(60, eng.generate, ["Hello"], greedy(4))
        assert isinstance(err, EngineRequestError) and elapsed < 30, (err, elapsed)
    finally:
        eng.shutdown()
    for a in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(a.__ray_ready__.remote(), timeout=30)
    deadline = time.monotonic() + 30
    while not _placement_groups_removed():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_ray_scheduler_actor_killed_mid_generation(ray_instance, tiny_model_dir):
    eng = LLM(str(tiny_model_dir), executor="ray", context_len=CTX, max_bs=4, device="cpu")
    workers = list(eng.core.workers)
    try:
        outs, delay = _kill_mid_generation(eng, lambda: ray.kill(eng.core.scheduler, no_restart=True))
        assert all(isinstance(o, EngineRequestError) and "scheduler actor died" in str(o) for o in outs), outs
        assert delay < 30, delay
        with pytest.raises(EngineUnavailableError, match="scheduler actor died"):
            eng.core.check_health()
        with pytest.raises(EngineUnavailableError, match="scheduler actor died"):
            eng.check_health()
        err, elapsed = within(30, eng.generate, ["Hello"], greedy(4))  # refused at once, not sent to a dead actor
        assert isinstance(err, EngineUnavailableError) and elapsed < 10, (err, elapsed)
    finally:
        _, took = within(60, eng.shutdown)
    assert took < 30
    for a in workers:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(a.__ray_ready__.remote(), timeout=30)


# ============================================================================ the Serve app


class Server:
    """One app of the module's Serve instance, under `prefix`."""

    def __init__(self, url: str, app_name: str):
        self.url, self.app_name = url, app_name
        self.http = httpx.Client(base_url=url, timeout=120)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", **{"max_retries": 0, "timeout": 120, **kw})

    def stats(self) -> dict:
        r = self.http.get("/v1/engine/stats")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_idle(self, timeout: float = 60.0) -> dict:
        """No request running, waiting or without an outcome in the replica; every KV slot free or
        held by the radix cache only."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if (
                s["num_running"] == 0
                and s["num_waiting"] == 0
                and s["num_outstanding_requests"] == 0
                and s["free_slots"] + s["cached_slots"] == s["num_slots"]
            ):
                return s
            assert time.monotonic() < deadline, f"engine not idle after {timeout}s: {s}"
            time.sleep(0.05)

    def replica_pid(self) -> int:
        (pid,) = ray_procs(f"ray::ServeReplica:{self.app_name}:")
        return pid


@pytest.fixture(scope="module")
def serve_url(ray_instance):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def _deploy(serve_url: str, name: str, **args) -> Server:
    from ray import serve

    from nanovllmx.serve import build_app

    app = build_app(
        {"model": DEMO_MODEL_NAME, "device": "cpu", "context_len": CTX, "ray_actor_options": {"num_cpus": 1}, **args}
    )
    serve.run(app, name=name, route_prefix=f"/{name}")
    return Server(f"{serve_url}/{name}", name)


@pytest.fixture(scope="module")
def main_app(serve_url) -> Server:
    srv = _deploy(serve_url, "main", max_bs=8, max_request_body_bytes=64 * 1024)
    yield srv
    srv.http.close()


@pytest.fixture(scope="module")
def small_app(serve_url) -> Server:
    """A tiny KV pool (one context) and a short queue: 4 running + 4 waiting."""
    srv = _deploy(serve_url, "small", max_bs=4, max_waiting_requests=4, num_kv_slots=CTX)
    yield srv
    srv.http.close()


def _is_openai_error(r: httpx.Response, status: int, param=..., code=...) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error"}, body
    e = body["error"]
    assert set(e) == {"message", "type", "param", "code"} and isinstance(e["message"], str) and e["message"], e
    if param is not ...:
        assert e["param"] == param, e
    if code is not ...:
        assert e["code"] == code, e
    return e


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
CMPL = {"prompt": "hi", "max_tokens": 4}


def _chunks(n: int, size: int):
    for _ in range(n):
        yield b" " * size


# (what, path, request kwargs for httpx, status, param, code): cases tests/serve/test_serve.py does not cover
BAD_INPUT = [
    (
        "body over the limit (Content-Length)",
        "/v1/completions",
        dict(content=json.dumps({**CMPL, "prompt": "x" * 100_000}).encode()),
        413,
        None,
        "request_too_large",
    ),
    (
        "body over the limit (chunked)",
        "/v1/completions",
        dict(content=_chunks(20, 8192)),
        413,
        None,
        "request_too_large",
    ),
    (
        "lone surrogate in a prompt",
        "/v1/completions",
        dict(content=b'{"prompt": "a\\ud800b", "max_tokens": 2}'),
        400,
        "prompt",
        "invalid_value",
    ),
    (
        "lone surrogate in a message",
        "/v1/chat/completions",
        dict(content=b'{"messages": [{"role": "user", "content": "\\udc00"}]}'),
        400,
        "messages",
        "invalid_value",
    ),
    (
        "lone surrogate in the model name",
        "/v1/completions",
        dict(content=b'{"model": "\\ud800", "prompt": "x"}'),
        400,
        "model",
        "invalid_value",
    ),
    (
        "lone surrogate in a stop string",
        "/v1/chat/completions",
        dict(content=b'{"messages": [{"role": "user", "content": "x"}], "stop": ["\\udfff"]}'),
        400,
        "stop",
        "invalid_value",
    ),
    (
        "invalid UTF-8 inside a JSON string",
        "/v1/completions",
        dict(content=b'{"prompt": "a\xff\xfeb"}'),
        400,
        None,
        ...,
    ),
    (
        "NaN temperature",
        "/v1/completions",
        dict(content=b'{"prompt": "x", "temperature": NaN}'),
        400,
        "temperature",
        "invalid_value",
    ),
    (
        "Infinity top_p",
        "/v1/chat/completions",
        dict(content=b'{"messages": [{"role": "user", "content": "x"}], "top_p": Infinity}'),
        400,
        "top_p",
        "invalid_value",
    ),
    (
        "temperature 1e400 (inf)",
        "/v1/completions",
        dict(content=b'{"prompt": "x", "temperature": 1e400}'),
        400,
        "temperature",
        "invalid_value",
    ),
    ("negative top_p", "/v1/completions", dict(json={**CMPL, "top_p": -0.5}), 400, "top_p", "invalid_value"),
    (
        "negative max_tokens (completions)",
        "/v1/completions",
        dict(json={**CMPL, "max_tokens": -1}),
        400,
        "max_tokens",
        "invalid_value",
    ),
    (
        "max_tokens beyond int64",
        "/v1/completions",
        dict(json={**CMPL, "max_tokens": 2**80}),
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    (
        "max_tokens as a string",
        "/v1/chat/completions",
        dict(json={**CHAT, "max_tokens": "5"}),
        400,
        "max_tokens",
        "invalid_value",
    ),
    (
        "temperature as a boolean",
        "/v1/completions",
        dict(json={**CMPL, "temperature": True}),
        400,
        "temperature",
        "invalid_value",
    ),
    ("top_k as a float", "/v1/completions", dict(json={**CMPL, "top_k": 1.5}), 400, "top_k", "invalid_value"),
    (
        "stream as a string",
        "/v1/chat/completions",
        dict(json={**CHAT, "stream": "yes"}),
        400,
        "stream",
        "invalid_value",
    ),
    (
        "deeply nested JSON",
        "/v1/completions",
        dict(content=b'{"prompt": ' + b"[" * 20000 + b"]" * 20000 + b"}"),
        400,
        ...,
        ...,
    ),
    ("a JSON list as the body", "/v1/chat/completions", dict(json=[CHAT]), 400, ..., "invalid_value"),
    ("a JSON string as the body", "/v1/completions", dict(json="hi"), 400, ..., "invalid_value"),
    (
        "messages is a string",
        "/v1/chat/completions",
        dict(json={**CHAT, "messages": "hi"}),
        400,
        "messages",
        "invalid_value",
    ),
    (
        "a message without a role",
        "/v1/chat/completions",
        dict(json={**CHAT, "messages": [{"content": "hi"}]}),
        400,
        "messages",
        "missing_required_parameter",
    ),
    (
        "a user message without content",
        "/v1/chat/completions",
        dict(json={**CHAT, "messages": [{"role": "user"}]}),
        400,
        "messages",
        "missing_required_parameter",
    ),
    (
        "a tool call the chat template cannot render",
        "/v1/chat/completions",
        dict(
            json={
                **CHAT,
                "messages": [{"role": "assistant", "tool_calls": [{"x": 1}]}, {"role": "user", "content": "x"}],
            }
        ),
        400,
        "messages",
        "invalid_messages",
    ),
    (
        "nested token ids out of the vocabulary",
        "/v1/completions",
        dict(json={**CMPL, "prompt": [[-1]]}),
        400,
        "prompt",
        "invalid_value",
    ),
]


def _replica_log(pid: int) -> Path:
    from ray._private import worker

    logs = Path(worker._global_node.get_session_dir_path()) / "logs"
    files = glob.glob(str(logs / f"worker-*-{pid}.err")) or glob.glob(str(logs / f"*{pid}*.err"))
    assert files, f"no log file of process {pid} in {logs}"
    return Path(files[0])


def _refusal_lines(log: Path) -> list[str]:
    return [ln for ln in log.read_text(errors="replace").splitlines() if "nanovllmx.serve:" in ln and " -> 4" in ln]


def test_bad_input_gets_4xx_openai_json_logged_once(main_app):
    log = _replica_log(main_app.replica_pid())
    before = len(_refusal_lines(log))
    for what, path, kw, status, param, code in BAD_INPUT:
        headers = {"content-type": "application/json"} if "content" in kw else {}
        r = main_app.http.post(path, headers=headers, **kw)
        try:
            _is_openai_error(r, status, param, code)
        except AssertionError as e:
            raise AssertionError(f"{what}: {e}") from None
    deadline = time.monotonic() + 60  # each refused request is logged exactly once
    while len(_refusal_lines(log)) - before < len(BAD_INPUT) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    lines = _refusal_lines(log)[before:]
    assert len(lines) == len(BAD_INPUT), "\n".join(lines)
    # the service keeps serving
    ok = main_app.client().chat.completions.create(
        model=DEMO_MODEL_NAME, messages=CHAT["messages"], max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert ok.usage.completion_tokens == 3
    assert main_app.http.get("/health").status_code == 200
    main_app.wait_idle()


def test_build_app_body_limit_and_queue_options():
    from nanovllmx.serve import build_app
    from nanovllmx.serve.middleware import DEFAULT_MAX_REQUEST_BODY_BYTES

    dep = build_app({"model": DEMO_MODEL_NAME, "device": "cpu"})._bound_deployment
    assert dep.init_kwargs["max_request_body_bytes"] == DEFAULT_MAX_REQUEST_BODY_BYTES
    # Serve hands the replica all that its engine may hold (256 running + 4096 waiting), so the
    # engine's bound (503 + Retry-After) applies, not an unbounded queue in Serve's router
    assert dep.max_ongoing_requests == 256 + 4096 + 1
    dep = build_app(
        {"model": DEMO_MODEL_NAME, "device": "cpu", "max_request_body_bytes": "1024", "max_waiting_requests": 16}
    )._bound_deployment
    assert dep.init_kwargs["max_request_body_bytes"] == 1024 and dep.init_args[2]["max_waiting_requests"] == 16
    for bad in (-1, "lots", 1.5):
        with pytest.raises(ValueError, match="max_request_body_bytes"):
            build_app({"model": DEMO_MODEL_NAME, "device": "cpu", "max_request_body_bytes": bad})
    from nanovllmx.entrypoints.openai import api_server

    args = api_server.app_args(
        api_server.parse_args(
            [
                "--model",
                DEMO_MODEL_NAME,
                "--device",
                "cpu",
                "--max-waiting-requests",
                "8",
                "--max-request-body-bytes",
                "100",
                "--graceful-shutdown-timeout",
                "5",
            ]
        )
    )
    assert args["max_waiting_requests"] == 8 and args["max_request_body_bytes"] == 100
    assert args["graceful_shutdown_timeout_s"] == 5
    dep = build_app(args)._bound_deployment
    assert dep._deployment_config.graceful_shutdown_timeout_s == 5 and dep.max_ongoing_requests == 256 + 8 + 1


def _complete(srv: Server, i: int, max_tokens: int, stream: bool = False, prompt_len: int = 12) -> tuple:
    """(status, Retry-After, completion tokens or error code, finish_reason)."""
    body = {
        "prompt": random_prompt(prompt_len, seed=1000 + i),
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
    }
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        if not stream:
            r = c.post("/v1/completions", json=body)
            j = r.json()
            if r.status_code != 200:
                return r.status_code, r.headers.get("retry-after"), _is_openai_error(r, r.status_code)["code"], None
            return 200, None, j["usage"]["completion_tokens"], j["choices"][0]["finish_reason"]
        with c.stream(
            "POST", "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
        ) as r:
            if r.status_code != 200:
                r.read()
                return r.status_code, r.headers.get("retry-after"), _is_openai_error(r, r.status_code)["code"], None
            events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    objs = [json.loads(e) for e in events[:-1]]
    finish = [o["choices"][0]["finish_reason"] for o in objs if o["choices"] and o["choices"][0]["finish_reason"]]
    return 200, None, objs[-1]["usage"]["completion_tokens"], finish[-1]


def test_overload_gets_503_with_retry_after(small_app):
    small_app.wait_idle()
    with cf.ThreadPoolExecutor(16) as ex:
        res = list(ex.map(lambda i: _complete(small_app, i, 40, stream=i % 2 == 1), range(16)))
    ok = [r for r in res if r[0] == 200]
    refused = [r for r in res if r[0] != 200]
    assert len(ok) + len(refused) == 16
    assert len(ok) >= 8 and refused, res  # 4 running + 4 waiting are always accepted
    assert all(r == (200, None, 40, "length") for r in ok), res
    assert all(r == (503, "1", "engine_overloaded", None) for r in refused), res
    small_app.wait_idle()
    # the official client honours Retry-After and retries: everyone gets an answer
    client = small_app.client(max_retries=8)

    def with_retries(i):
        return client.completions.create(
            model=DEMO_MODEL_NAME,
            prompt=random_prompt(8, seed=2000 + i),
            max_tokens=16,
            extra_body={"ignore_eos": True},
        ).usage.completion_tokens

    with cf.ThreadPoolExecutor(12) as ex:
        assert list(ex.map(with_retries, range(12))) == [16] * 12
    small_app.wait_idle()


def test_kv_exhaustion_preempts_and_every_request_finishes(small_app):
    """8 requests of 60 + 60 tokens on a pool of 256 slots: about two fit at a time. The scheduler
    preempts (and later recomputes) instead of failing anyone."""
    before = small_app.wait_idle()["num_preempted_total"]
    with cf.ThreadPoolExecutor(8) as ex:
        res = list(ex.map(lambda i: _complete(small_app, 100 + i, 60, stream=i % 2 == 0, prompt_len=60), range(8)))
    assert res == [(200, None, 60, "length")] * 8, res
    after = small_app.wait_idle()
    assert after["num_preempted_total"] > before, after


def test_soak_mixed_requests_with_random_disconnects(main_app):
    """60 requests (chat / completions, streaming or not, 6 at a time), a third of the clients
    leave early. Every request gets an outcome, nothing leaks, the replica's memory stays put."""
    rng = random.Random(7)
    plan = [
        dict(
            i=i,
            chat=rng.random() < 0.5,
            stream=rng.random() < 0.5,
            max_tokens=rng.randint(4, 40),
            leave=rng.random() < 0.33,
            leave_after=rng.randint(1, 6),
            read_timeout=rng.uniform(0.1, 0.4),
        )
        for i in range(60)
    ]
    start = main_app.wait_idle()

    def one(p) -> str:
        body = {"max_tokens": p["max_tokens"], "ignore_eos": True, "stream": p["stream"]}
        if p["chat"]:
            path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": f"Request {p['i']}: go on."}]
        else:
            path, body["prompt"] = "/v1/completions", random_prompt(5 + p["i"] % 40, seed=3000 + p["i"])
        timeout = httpx.Timeout(60, read=p["read_timeout"]) if p["leave"] and not p["stream"] else 60
        with httpx.Client(base_url=main_app.url, timeout=timeout) as c:
            if not p["stream"]:
                try:
                    r = c.post(path, json=body)
                except httpx.ReadTimeout:
                    return "left"
                assert r.status_code == 200, r.text
                assert r.json()["usage"]["completion_tokens"] == p["max_tokens"]
                return "done"
            with c.stream("POST", path, json=body) as r:
                assert r.status_code == 200
                n = 0
                lines = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        n += 1
                        lines.append(line)
                        if p["leave"] and n >= p["leave_after"]:
                            return "left"  # closing the response drops the connection
            assert lines[-1] == "data: [DONE]" and '"finish_reason":"length"' in lines[-2], lines[-3:]
            return "done"

    def run(batch):
        with cf.ThreadPoolExecutor(6) as ex:
            futs = [ex.submit(one, p) for p in batch]
            return [f.result(timeout=120) for f in futs]  # every request has an outcome, none hangs

    t0 = time.monotonic()
    outcomes = run(plan[:12])  # warm-up: the replica's allocators settle
    main_app.wait_idle()
    pid = main_app.replica_pid()
    rss0 = _proc_info(pid)[2]
    outcomes += run(plan[12:])
    took = time.monotonic() - t0
    end = main_app.wait_idle()
    rss1 = _proc_info(pid)[2]
    assert main_app.replica_pid() == pid  # the same replica all along
    assert len(outcomes) == 60 and set(outcomes) <= {"done", "left"}
    left = outcomes.count("left")
    aborted = end["num_aborted_requests"] - start["num_aborted_requests"]
    assert 1 <= aborted <= left, (aborted, left)  # a client that left after the end aborts nothing
    assert end["free_slots"] + end["cached_slots"] == end["num_slots"]
    assert rss1 - rss0 < 200 * 2**20, f"replica RSS grew by {(rss1 - rss0) / 2**20:.0f} MiB"
    print(
        f"soak: 60 requests, {left} clients left early ({aborted} aborted in the engine) in {took:.1f}s; "
        f"replica RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB"
    )
    assert took < 240  # 60 short requests (about 20 s on an idle 2-core machine): none hangs


def test_actor_failure_fails_requests_and_serve_replaces_the_replica(serve_url):
    """The engine on Ray (a scheduler actor and a worker actor per replica). Kill the worker's
    process mid-generation: requests in flight fail at once with a 5xx (streams with an error
    event), /health says 503, Serve's health check replaces the replica, and the new one serves."""
    from ray import serve

    before = set(ray_procs("ray::WorkerActor")) | set(ray_procs("ray::SchedulerActor"))
    srv = _deploy(serve_url, "rayapp", executor="ray", max_bs=4, health_check_period_s=1, health_check_timeout_s=10)
    try:
        old_replica = srv.stats()["replica"]
        (worker_pid,) = set(ray_procs("ray::WorkerActor")) - before
        (sched_pid,) = set(ray_procs("ray::SchedulerActor")) - before
        started = threading.Event()
        result: dict = {}

        def streaming():
            body = {"prompt": "Tell me everything.", "max_tokens": 200, "ignore_eos": True, "stream": True}
            with httpx.Client(base_url=srv.url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
                lines = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
                        if len(lines) == 3:
                            started.set()
                result["stream"] = (r.status_code, lines, time.monotonic())

        def blocking():
            r = httpx.post(
                srv.url + "/v1/chat/completions",
                timeout=60,
                json={"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 200, "ignore_eos": True},
            )
            result["plain"] = (r, time.monotonic())

        threads = [threading.Thread(target=streaming), threading.Thread(target=blocking)]
        for t in threads:
            t.start()
        assert started.wait(30)
        t_kill = time.monotonic()
        os.kill(worker_pid, signal.SIGKILL)
        for t in threads:
            t.join(60)
            assert not t.is_alive(), "a request hangs after its worker died"
        status, lines, t_end = result["stream"]
        assert status == 200 and lines[-1] == "data: [DONE]"
        err = json.loads(lines[-2][6:])  # the engine died under it: engine_unavailable (issue 19)
        assert err["error"]["code"] == "engine_unavailable" and err["error"]["type"] == "server_error", err
        assert t_end - t_kill < 30
        r, t_end = result["plain"]
        _is_openai_error(r, 503, None, "engine_unavailable")  # nothing reached the client: 503 + Retry-After
        assert r.headers["retry-after"]
        assert t_end - t_kill < 30
        health = srv.http.get("/health")
        assert health.status_code == 503, health.text  # the dead engine's replica (or none, while replaced)
        # Serve replaces the replica: wait until a request succeeds on a new one
        deadline = time.monotonic() + 180
        while True:
            try:
                r = srv.http.post(
                    "/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "ignore_eos": True}, timeout=30
                )
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "no healthy replica after 180s"
            time.sleep(0.5)
        assert r.json()["usage"]["completion_tokens"] == 3
        assert srv.stats()["replica"] != old_replica
        assert srv.http.get("/health").status_code == 200
        print(f"replica replaced {time.monotonic() - t_kill:.1f}s after the worker was killed")
        deadline = time.monotonic() + 30  # the old replica's actors went with it
        while _proc_info(sched_pid) is not None or _proc_info(worker_pid) is not None:
            assert time.monotonic() < deadline, "the dead replica's scheduler actor is still there"
            time.sleep(0.2)
        now = set(ray_procs("ray::WorkerActor")) | set(ray_procs("ray::SchedulerActor"))
        assert len(now - before) == 2  # the new replica's scheduler and worker, nothing else
    finally:
        srv.http.close()
        serve.delete("rayapp")


# ============================================================================ SIGTERM to the api_server
def _marked(marker: str) -> list[tuple[int, str]]:
    """Live processes whose environment carries `marker` (they descend from the process we started)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                if marker.encode() in Path(f"/proc/{d}/environ").read_bytes():
                    info = _proc_info(int(d))
                    if info:
                        out.append((int(d), info[0][:300]))
            except OSError:
                pass
    return out


def test_sigterm_drains_in_flight_requests_and_leaves_no_process(tmp_path):
    """SIGTERM to `python -m nanovllmx.entrypoints.openai.api_server`: a stream in flight runs to its
    end, the process exits 0, and every process it started (Ray's included) is gone."""
    marker = f"nanovllmx-reliability-{uuid.uuid4().hex}"
    env = {**os.environ, "NANOVLLMX_TEST_MARKER": marker}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    log_path = tmp_path / "api_server.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nanovllmx.entrypoints.openai.api_server",
            "--model",
            DEMO_MODEL_NAME,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--context-len",
            str(CTX),
            "--max-bs",
            "4",
            "--device",
            "cpu",
            "--graceful-shutdown-timeout",
            "30",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_api_server(url, proc, log_path)
        procs = _marked(marker)
        assert any("raylet" in c for _, c in procs) and any("ServeReplica" in c for _, c in procs), procs
        print(f"api_server: {len(procs)} processes carry the marker")
        started, result = threading.Event(), {}

        def streaming():
            body = {
                "prompt": "Once upon a time",
                "max_tokens": 200,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            with httpx.Client(timeout=60) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
                lines = []
                try:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            lines.append(line)
                            started.set()
                except httpx.HTTPError as e:
                    lines.append(f"broken: {e!r}")
                result["lines"] = lines

        t = threading.Thread(target=streaming)
        t.start()
        assert started.wait(30)
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # during the drain a new request gets OpenAI's 503 (the `Draining` app holds the route),
        # never the proxy's plain-text 404 or a 500; before Draining is up it may still be served
        refused = None
        while t.is_alive() and refused is None:
            try:
                r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
            except httpx.HTTPError:
                break
            if r.status_code != 200:
                refused = r
                _is_openai_error(r, 503, None, "engine_unavailable")
                assert r.headers["retry-after"] and r.headers["x-request-id"] in r.json()["error"]["message"]
            time.sleep(0.3)
        t.join(60)
        lines = result["lines"]
        assert lines[-1] == "data: [DONE]", lines[-3:]  # the stream ran to its end
        assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 200, lines[-3:]
        assert refused is not None, "no request was refused with a 503 during the drain"
        rc = proc.wait(timeout=90)
        took = time.monotonic() - t_term
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert rc == 0, log_path.read_text()[-3000:]
    deadline = time.monotonic() + 30
    while (left := _marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"stray processes after SIGTERM: {left}"
    print(f"api_server: drained and exited {took:.1f}s after SIGTERM, no process left")
