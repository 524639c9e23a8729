"""Throughput benchmark on the standard workload (as in nano-vllm / Nano-vLLM-X): 256 requests,
prompt and output lengths uniform in 100..1024 (random.seed(0): 133,966 output tokens),
temperature 0.6, ignore_eos, all submitted at once.

  python bench.py --model /path/to/qwen3-0.6b                 # offline, through LLM.generate
  python bench.py --model M --logprobs 5                      # the same with top-5 logprobs on every request
  python bench.py --model M --bw                              # also measure copy bandwidth + roofline bound
                                                              # (benchmarks/roofline.py, M's config.json)
  python bench.py --model M --http --start-server --request-rates 1,2,4,8,inf --json r.jsonl --plot r.png
                                                              # online: the Serve app, a sweep of Poisson rates
  python bench.py --model M --http --start-server --direct-ingress-port 30000
                                                              # online, to the replica without Serve's proxy
  python bench.py --model M --http --prompts-file chats.jsonl --request-rate 4 --concurrency 64

The GPU runs behind docs/benchmarks.md: benchmarks/gpu_run.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from random import randint, seed

from benchmarks import roofline
from nanovllmx.config import EngineConfig


def standard_workload(num_seqs: int = 256, max_in: int = 1024, max_out: int = 1024):
    """Same draw order as the seed's bench.py and benchmarks/roofline.py."""
    from nanovllmx import SamplingParams

    seed(0)
    prompts = [[randint(0, 10000) for _ in range(randint(100, max_in))] for _ in range(num_seqs)]
    params = [
        SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(100, max_out)) for _ in range(num_seqs)
    ]
    return prompts, params


# --json-schema-frac: the schema a share of the standard workload's requests is held to (structured
# outputs, issue 22). Nested arrays of objects keep the grammar busy for many tokens; with ignore_eos
# a request whose JSON is complete goes on with the only tokens its grammar then allows (EOS) up to
# its max_tokens, so the token count stays the standard workload's.
BENCH_SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "name": {"type": "string"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "score": {"type": "number"},
                },
                "required": ["id", "name", "tags", "score"],
            },
        }
    },
    "required": ["items"],
}


def constrained_indices(num_seqs: int, frac: float) -> list[int]:
    """Which requests get BENCH_SCHEMA: about frac of them, spread evenly (every 4th for 0.25)."""
    if frac <= 0:
        return []
    return sorted({min(num_seqs - 1, int(i / frac)) for i in range(round(num_seqs * frac))})


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _latency_ms(xs: list[float]) -> dict[str, float]:
    """p50 / p90 / p99 and mean of latencies in seconds, in ms."""
    return {**{f"p{q}": round(1e3 * _pct(xs, q), 2) for q in (50, 90, 99)}, "mean": round(1e3 * _mean(xs), 2)}


# one token of a 3-token prompt: the requests that probe a server before a workload
PROBE = {"prompt": [1, 2, 3], "max_tokens": 1}


def http_requests_standard(model: str, num_seqs: int, json_schema_frac: float = 0.0) -> list[tuple[str, dict]]:
    """The standard workload as streaming /v1/completions requests (token-id prompts); with
    json_schema_frac, that share of them under BENCH_SCHEMA (vLLM's structured_outputs field)."""
    prompts, params = standard_workload(num_seqs)
    out = [
        (
            "/v1/completions",
            {
                "model": model,
                "prompt": p,
                "max_tokens": sp.max_tokens,
                "temperature": sp.temperature,
                "ignore_eos": sp.ignore_eos,
            },
        )
        for p, sp in zip(prompts, params)
    ]
    for i in constrained_indices(num_seqs, json_schema_frac):
        out[i][1]["structured_outputs"] = {"json": BENCH_SCHEMA}
    return out


def http_requests_from_file(
    path: str, model: str, num_seqs: int | None, max_tokens: int, temperature: float, ignore_eos: bool
) -> list[tuple[str, dict]]:
    """Chat requests from a JSONL file, one `{"messages": [...]}` per line (optional per-line
    `max_tokens` / `temperature`), sent to /v1/chat/completions. With `num_seqs`, the lines are
    cycled or cut to that many requests."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
                raise SystemExit(f"{path}:{i}: each line must be a JSON object with a 'messages' list")
            rows.append(row)
    if not rows:
        raise SystemExit(f"{path}: no prompts")
    if num_seqs:
        rows = [rows[i % len(rows)] for i in range(num_seqs)]
    out = []
    for row in rows:
        body = {
            "model": model,
            "messages": row["messages"],
            "max_tokens": int(row.get("max_tokens", max_tokens)),
            "temperature": float(row.get("temperature", temperature)),
        }
        if ignore_eos:
            body["ignore_eos"] = True
        out.append(("/v1/chat/completions", body))
    return out


def _http_run(
    base: str,
    requests: list[tuple[str, dict]],
    concurrency: int | None,
    rate: float | None,
    procs: int = 1,
    timeout: float = 3600.0,
) -> dict:
    """Send (route, body) requests streaming, with Poisson arrivals at `rate` per second (None: all
    at once) and at most `concurrency` in flight; time every request. TTFT is the time to the first
    chunk with text; ITL the gaps between text chunks (one chunk per engine step).

    The load is spread over `procs` client processes (request i to process i % procs, each with its
    share of the rate and the concurrency, all starting at one wall-clock time): one Python process
    reads ~45k SSE events/s at most (aiohttp; httpx ~16k), and a client that falls behind reads
    its sockets in bursts, which shows up as the server's inter-token tail (10th session: ITL p50
    0.03 ms, p99 52 ms). `client_cpu` is the busiest process's CPU share of the run: near 1.0 the
    numbers measure the client."""
    import asyncio
    import multiprocessing

    procs = max(1, min(procs, len(requests)))
    conc = None if concurrency is None else -(-concurrency // procs)
    share = None if not rate or rate == float("inf") else rate / procs
    jobs = [(base, requests[i::procs], conc, share, timeout, i) for i in range(procs)]
    if procs == 1:
        parts = [asyncio.run(_http_client(*jobs[0], time.time()))]
    else:  # spawn: never fork a process that may hold Ray's or the server's threads
        with multiprocessing.get_context("spawn").Pool(procs) as pool:
            pool.map(int, range(procs), chunksize=1)  # the processes are up (imports done)
            start = time.time() + 1.0  # every process starts sending at this wall-clock time
            parts = pool.map(_http_client_proc, [(*j, start) for j in jobs], chunksize=1)
    merged: dict[str, list] = {k: [x for p in parts for x in p[k]] for k in parts[0] if isinstance(parts[0][k], list)}
    dt = max(p["t_end"] for p in parts) - min(p["t_start"] for p in parts)
    ttft, itl, e2e, errors = merged["ttft"], merged["itl"], merged["e2e"], merged["errors"]
    out_tokens, in_tokens = sum(merged["out_tokens"]), sum(merged["in_tokens"])
    return {
        "ttft_ms": _latency_ms(ttft),
        "itl_ms": _latency_ms(itl),
        "e2e_s": {k: round(v / 1e3, 3) for k, v in _latency_ms(e2e).items()},
        "requests": len(requests),
        "completed": len(e2e),
        "seconds": round(dt, 3),
        "request_throughput": round(len(e2e) / dt, 3),
        "prompt_tokens": in_tokens,
        "completion_tokens": out_tokens,
        "tok_per_s": round(out_tokens / dt, 1),
        "total_tok_per_s": round((out_tokens + in_tokens) / dt, 1),
        "client_procs": procs,
        "client_cpu": round(max(p["cpu"] / max(p["t_end"] - p["t_start"], 1e-9) for p in parts), 3),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def _http_client_proc(job: tuple) -> dict:
    """One client process's share (`_http_run`), on its own event loop."""
    import asyncio

    return asyncio.run(_http_client(*job))


async def _http_client(
    base: str,
    requests: list[tuple[str, dict]],
    concurrency: int | None,
    rate: float | None,
    timeout: float,
    seed_: int,
    start: float,
) -> dict:
    """One process's requests (`_http_run`): the raw timings, and the process's CPU time."""
    import asyncio
    import random

    import aiohttp

    rng = random.Random(seed_)
    sem = asyncio.Semaphore(concurrency or len(requests))
    ttft: list[float] = []
    itl: list[float] = []
    e2e: list[float] = []
    out_tokens: list[int] = []
    in_tokens: list[int] = []
    errors: list[str] = []
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(base, connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as session:

        async def one(route: str, body: dict) -> None:
            body = {**body, "stream": True, "stream_options": {"include_usage": True}}
            async with sem:
                t0 = time.perf_counter()
                last, usage = None, None
                try:
                    async with session.post(route, json=body) as r:
                        if r.status != 200:
                            errors.append(f"{r.status}: {(await r.read())[:200]!r}")
                            return
                        async for line in r.content:  # one SSE line at a time
                            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                                continue
                            ev = json.loads(line[6:])
                            now = time.perf_counter()
                            if "error" in ev:
                                errors.append(f"stream error: {ev['error'].get('message')}")
                                return
                            if ev.get("usage"):
                                usage = ev["usage"]
                            ch = ev.get("choices") or []
                            if not ch:
                                continue
                            text = ch[0].get("text") if "text" in ch[0] else (ch[0].get("delta") or {}).get("content")
                            if not text:  # the role chunk, a finish-only chunk
                                continue
                            if last is None:
                                ttft.append(now - t0)
                            else:
                                itl.append(now - last)
                            last = now
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    return
                e2e.append(time.perf_counter() - t0)
                out_tokens.append(usage["completion_tokens"] if usage else 0)
                in_tokens.append(usage["prompt_tokens"] if usage else 0)

        await asyncio.sleep(max(0.0, start - time.time()))
        t_start, cpu0 = time.time(), time.process_time()
        tasks = []
        for route, body in requests:
            tasks.append(asyncio.create_task(one(route, body)))
            if rate:
                await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        t_end, cpu = time.time(), time.process_time() - cpu0
    return dict(
        ttft=ttft,
        itl=itl,
        e2e=e2e,
        out_tokens=out_tokens,
        in_tokens=in_tokens,
        errors=errors,
        t_start=t_start,
        t_end=t_end,
        cpu=cpu,
    )


def _parse_rates(a) -> list[float | None]:
    """--request-rates R1,R2,... ('inf': all at once), else --request-rate, else all at once."""
    if a.request_rates:
        out = []
        for x in a.request_rates.split(","):
            x = x.strip().lower()
            if x:
                v = float(x)  # accepts 'inf'
                if v <= 0:
                    raise SystemExit(f"--request-rates: rates must be > 0, got {x}")
                out.append(None if v == float("inf") else v)
        return out
    return [a.request_rate]


def multiturn_conversations(n: int, turns: int, seed_: int = 0) -> list[list[str]]:
    """The user turns of `n` conversations: each turn ~120 words (~130 tokens), distinct per conversation."""
    import random

    rng = random.Random(seed_)
    words = "alpha beta gamma delta river stone cloud lamp tiger maple orbit quartz north amber violet".split()
    return [[" ".join(rng.choice(words) for _ in range(120)) for _ in range(turns)] for _ in range(n)]


async def _multiturn_run(base: str, model: str, convs: list[list[str]], max_tokens: int) -> dict:
    """Conversations interleaved (all at once), turns of each in order: turn t's messages are turn
    t-1's plus its answer plus a new user turn. Hit rate = cached / prompt tokens (usage)."""
    import asyncio

    import httpx

    prompt, cached, out, errors = [0], [0], [0], []
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:

        async def conversation(turns: list[str]) -> None:
            msgs: list[dict] = []
            for user in turns:
                msgs.append({"role": "user", "content": user})
                body = {"model": model, "messages": msgs, "max_tokens": max_tokens, "temperature": 0}
                r = await client.post("/v1/chat/completions", json=body)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                    return
                res = r.json()
                u = res["usage"]
                prompt[0] += u["prompt_tokens"]
                cached[0] += (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                out[0] += u["completion_tokens"]
                msgs.append({"role": "assistant", "content": res["choices"][0]["message"]["content"]})

        t = time.perf_counter()
        await asyncio.gather(*(conversation(c) for c in convs))
        dt = time.perf_counter() - t
    return {
        "workload": "multiturn",
        "conversations": len(convs),
        "turns": len(convs[0]) if convs else 0,
        "requests": sum(map(len, convs)),
        "seconds": round(dt, 3),
        "prompt_tokens": prompt[0],
        "cached_tokens": cached[0],
        "hit_rate": round(cached[0] / max(prompt[0], 1), 4),
        "tok_per_s": round(out[0] / dt, 1),
        "total_tok_per_s": round((out[0] + prompt[0]) / dt, 1),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def _with_serve_config(a) -> list[dict]:
    """`serve run CONFIG` as users run it (same YAML: its proxy / ingress settings, its deployment
    options), with only the app's model and batch arguments replaced by this run's; then the workload
    through the config's HTTP port, then Ctrl-C (SIGINT) to stop it."""
    import signal
    import subprocess
    import tempfile

    import httpx
    import yaml

    with open(a.serve_config) as f:
        cfg = yaml.safe_load(f)
    app = cfg["applications"][0]
    app["args"].update(_app_args(a))
    app["args"].pop("served_model_name", None)
    port = (cfg.get("http_options") or {}).get("port", 8000)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(cfg, f)
    log = open(os.path.join(tempfile.gettempdir(), "bench_serve_run.log"), "w")
    # SIGINT restored: a background job (`python bench.py ... &`) inherits it ignored, and then the
    # Ctrl-C below would not stop serve run (nor the HAProxy it started)
    proc = subprocess.Popen(
        ["serve", "run", f.name],
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        t_launch = time.time()
        deadline = t_launch + 600
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"serve run {a.serve_config} did not come up (log: {log.name})")
            time.sleep(2)
        sub = argparse.Namespace(**{**vars(a), "serve_config": None, "start_server": False})
        sub.frontends = int(app["args"].get("frontends", 1))  # the config's own unless --frontends: wait for each
        sub.url, sub.http_mode = f"http://127.0.0.1:{port}", f"http-config:{os.path.basename(a.serve_config)}"
        sub.startup_s = round(time.time() - t_launch, 1)  # `serve run` to the first /v1/models answer
        return http_bench(sub)
    finally:
        proc.send_signal(signal.SIGINT)  # serve run shuts the app and its local Ray down on Ctrl-C
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _app_args(a) -> dict:
    """build_app's model and batch arguments from this run's flags (--start-server and --serve-config)."""
    args = {
        "model": a.model,
        "max_bs": a.max_bs,
        "context_len": a.context_len,
        "tp_size": a.tp_size,
        "pp_size": a.pp_size,
        "gpu_memory_utilization": a.gpu_memory_utilization,
    }
    if a.device:
        args["device"] = a.device
    if a.executor != "auto":  # else build_app's choice (ray on GPU)
        args["executor"] = a.executor
    if a.frontends is not None:  # else the config's own (build_app's default: 1)
        args["frontends"] = a.frontends
    return args


def _wait_frontends(url: str, model: str, n: int, timeout: float = 300.0) -> None:
    """Until each of the n HTTP frontends has served a request (the engine's per-client counters in
    /v1/engine/stats): HAProxy balances connections only over the frontends its health checks passed,
    and a workload started before the last one is up keeps its connections on the others."""
    import httpx

    deadline = time.time() + timeout
    while True:
        # n requests in a row, each on a new connection: HAProxy balances connections (round robin
        # among equally loaded frontends), so n in a row reach n frontends once all are UP
        for _ in range(n):
            body = {"model": model, **PROBE}
            # bounded by the whole wait's deadline (the first request, timed above, already paid any compile)
            httpx.post(url + "/v1/completions", json=body, timeout=max(5.0, deadline - time.time()))
        clients = httpx.get(url + "/v1/engine/stats", timeout=60).json().get("clients", {})
        served = sum(1 for c in clients.values() if c["num_requests"] > 0)
        if served >= n:
            return
        if time.time() > deadline:
            raise SystemExit(f"only {served} of {n} frontends served a request after {timeout:.0f}s: {clients}")
        time.sleep(0.5)


def http_bench(a) -> list[dict]:
    """Through the Serve app: start it here (--start-server) or use one running at --url. One result
    per request rate."""
    import asyncio

    import httpx

    server, url = None, a.url
    if a.serve_config:
        return _with_serve_config(a)
    if a.direct_ingress_port is not None:
        if not a.start_server:
            raise SystemExit("--direct-ingress-port needs --start-server (Serve reads it when Ray starts)")
        # as `api_server --direct-ingress-port`: the replica serves HTTP itself on this port, no proxy hop
        os.environ.update(
            RAY_SERVE_ENABLE_DIRECT_INGRESS="1",
            RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(a.direct_ingress_port),
            RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(a.direct_ingress_port + 1000),
        )
        url = f"http://127.0.0.1:{a.direct_ingress_port}"
    if a.start_server:
        from ray import serve

        from nanovllmx.serve import build_app

        args = {**_app_args(a), "enforce_eager": a.enforce_eager}
        if a.num_replicas > 1:
            args["num_replicas"] = a.num_replicas
            args["prefix_routing"] = a.prefix_routing != "off"
        if a.num_cpus_per_replica is not None:
            args["ray_actor_options"] = {"num_cpus": a.num_cpus_per_replica}
        serve.start(http_options={"host": "127.0.0.1", "port": int(a.url.rsplit(":", 1)[1].split("/")[0])})
        server = serve.run(build_app(args), name="bench", route_prefix="/")
    try:
        for attempt in range(60):  # the direct-ingress port can open a little after serve.run returns
            try:
                model = httpx.get(url + "/v1/models", timeout=60).json()["data"][0]["id"]
                break
            except httpx.TransportError:
                if attempt == 59 or server is None:
                    raise
                time.sleep(1)
        # the first request, also the workload's warm-up: on a fresh machine, anything the engine did
        # not compile while starting (its kernels' JIT) is paid here
        t = time.perf_counter()
        httpx.post(url + "/v1/completions", json={"model": model, **PROBE}, timeout=600)
        first_request_s = round(time.perf_counter() - t, 3)
        if (a.frontends or 1) > 1:
            _wait_frontends(url, model, a.frontends)
        if a.workload == "multiturn":
            convs = multiturn_conversations(a.conversations, a.turns)
            res = asyncio.run(_multiturn_run(url, model, convs, a.max_tokens))
            res.update({"num_replicas": a.num_replicas, "router": a.prefix_routing if a.num_replicas > 1 else "-"})
            print(json.dumps(res), flush=True)
            return [res]
        if a.prompts_file:
            requests = http_requests_from_file(
                a.prompts_file, model, a.num_seqs, a.max_tokens, a.temperature, a.ignore_eos
            )
            workload = f"file:{os.path.basename(a.prompts_file)}"
        else:
            requests = http_requests_standard(model, a.num_seqs or 256, a.json_schema_frac)
            workload = "standard"
        results = []
        for rate in _parse_rates(a):
            res = _http_run(url, requests, a.concurrency, rate, a.client_procs)
            res.update(
                {
                    "mode": getattr(a, "http_mode", None)
                    or ("http" if a.direct_ingress_port is None else "http-direct"),
                    "workload": workload,
                    "request_rate": rate if rate else "inf",
                    "concurrency": a.concurrency,
                    "frontends": a.frontends or 1,
                    "first_request_s": first_request_s,
                    "startup_s": getattr(a, "startup_s", None),
                }
            )
            results.append(res)
            print(json.dumps(res), flush=True)
    finally:
        if server is not None:
            from ray import serve

            serve.shutdown()
    return results


def print_table(results: list[dict]) -> None:
    head = (
        f"{'rate':>6} {'req/s':>7} {'out tok/s':>9} | {'TTFT ms p50':>11} {'p90':>8} {'p99':>8} | "
        f"{'ITL ms p50':>10} {'p90':>7} {'p99':>7} | {'e2e s p50':>9} {'p99':>7} | err"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        t, i, e = r["ttft_ms"], r["itl_ms"], r["e2e_s"]
        print(
            f"{str(r['request_rate']):>6} {r['request_throughput']:>7.2f} {r['tok_per_s']:>9.1f} | "
            f"{t['p50']:>11.1f} {t['p90']:>8.1f} {t['p99']:>8.1f} | {i['p50']:>10.2f} {i['p90']:>7.2f} "
            f"{i['p99']:>7.2f} | {e['p50']:>9.2f} {e['p99']:>7.2f} | {r['errors']}"
        )


def plot_latency(results: list[dict], path: str) -> bool:
    """TTFT and ITL p50/p99 versus request rate, as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot: matplotlib is not installed (pip install matplotlib); {path} not written", file=sys.stderr)
        return False
    finite = [r["request_rate"] for r in results if r["request_rate"] != "inf"]
    inf_x = 2 * max(finite) if finite else 1.0
    xs = [inf_x if r["request_rate"] == "inf" else r["request_rate"] for r in results]
    order = sorted(range(len(results)), key=lambda k: xs[k])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "ttft_ms", "time to first token"), (axes[1], "itl_ms", "inter-token latency")):
        for q, style in (("p50", "o-"), ("p99", "s--")):
            ax.plot([xs[k] for k in order], [results[k][key][q] for k in order], style, label=q)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
        if any(r["request_rate"] == "inf" for r in results):
            ticks = sorted(set(xs))
            ax.set_xticks(ticks, ["inf" if x == inf_x else f"{x:g}" for x in ticks])
    fig.suptitle(f"nanovllmx: latency vs request rate ({results[0].get('workload', '')})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument(
        "--num-seqs", type=int, default=None, help="requests (default 256; with --prompts-file: every line once)"
    )
    ap.add_argument("--max-bs", type=int, default=EngineConfig.max_bs)
    ap.add_argument("--tp-size", type=int, default=1)
    ap.add_argument("--pp-size", type=int, default=1)
    ap.add_argument(
        "--pp-inflight-batches", type=int, default=None, help="pipeline lanes (default pp_size + 1; 1: off)"
    )
    ap.add_argument(
        "--tp-allreduce", default="one_shot", choices=("nccl", "one_shot"), help="TP all-reduce of small messages"
    )
    ap.add_argument("--executor", default="auto")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--context-len", type=int, default=4096)
    ap.add_argument(
        "--bw",
        action="store_true",
        help="measure the copy bandwidth and report the run against the roofline bound of --model's shape",
    )
    ap.add_argument("--no-overlap", action="store_true", help="schedule each step only after the previous one")
    ap.add_argument("--decode-tensor-cores", type=int, default=None, choices=[0, 1])
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="per-step token budget (prefill chunk)")
    ap.add_argument("--fp8-gemm", default="auto", choices=["auto", "triton", "dequant"], help="FP8 checkpoints")
    ap.add_argument(
        "--decode-only",
        action="store_true",
        help="offline: the standard workload with every prompt cut to 16 tokens (its time is nearly all decode; "
        "no roofline bound)",
    )
    ap.add_argument("--torch-profile", default=None, help="write a torch.profiler kernel table of the run here")
    ap.add_argument("--profile", action="store_true", help="print the per-step time breakdown")
    ap.add_argument(
        "--json-schema-frac",
        type=float,
        default=0.0,
        help="this share of the standard workload's requests under a JSON schema (structured outputs); 0.25: every 4th",
    )
    ap.add_argument("--top-k", type=int, default=0, help="offline: top_k for every request (standard: 0, off)")
    ap.add_argument("--top-p", type=float, default=1.0, help="offline: top_p for every request (standard: 1, off)")
    ap.add_argument(
        "--logprobs",
        type=int,
        default=None,
        help="offline: logprobs for every request (the sampled token's and this many top ones; standard: none)",
    )
    ap.add_argument(
        "--json", default=None, help="append every result (one per request rate) as a JSON line to this file"
    )
    ap.add_argument("--http", action="store_true", help="send the workload through the OpenAI HTTP API")
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--start-server", action="store_true", help="with --http: serve.run the app for --model here")
    ap.add_argument(
        "--direct-ingress-port",
        type=int,
        default=None,
        help="with --start-server: Serve's direct ingress (the replica answers HTTP on this port, no proxy "
        "hop; docs/serving.md, 'Fast path'); the workload goes to this port",
    )
    ap.add_argument(
        "--serve-config",
        default=None,
        help="with --http: `serve run` this YAML as users do (e.g. serve_configs/qwen3.yaml: its ingress and "
        "deployment settings) with --model and the batch arguments put into its app, and measure through it",
    )
    ap.add_argument("--request-rate", type=float, default=None, help="with --http: Poisson arrivals per second")
    ap.add_argument("--concurrency", type=int, default=None, help="with --http: most requests in flight")
    ap.add_argument(
        "--client-procs",
        type=int,
        default=max(1, min(4, (os.cpu_count() or 1) // 4)),
        help="with --http: load-generator processes (default: a quarter of the cores, 1-4); one Python process "
        "reads ~45k SSE events/s at most, and a saturated client shows up as burst ITLs (see client_cpu)",
    )
    ap.add_argument(
        "--request-rates",
        default=None,
        help="with --http: a sweep, e.g. 1,2,4,8,inf (one run of the workload per rate)",
    )
    ap.add_argument(
        "--prompts-file",
        default=None,
        help='with --http: JSONL of chat prompts {"messages": [...]} (optional "max_tokens"), '
        "sent to /v1/chat/completions instead of the standard workload",
    )
    ap.add_argument("--max-tokens", type=int, default=256, help="with --prompts-file: default max_tokens")
    ap.add_argument("--temperature", type=float, default=0.6, help="with --prompts-file: default temperature")
    ap.add_argument("--ignore-eos", action="store_true", help="with --prompts-file: generate max_tokens tokens")
    ap.add_argument("--plot", default=None, help="with --http: PNG of TTFT / ITL p50 and p99 vs request rate")
    ap.add_argument(
        "--workload",
        default="standard",
        choices=["standard", "multiturn"],
        help="with --http: multiturn = --conversations chats of --turns turns each (every turn extends the "
        "previous prompt with its answer and a new user turn), interleaved; reports the prefix-cache hit rate",
    )
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--num-replicas", type=int, default=1, help="with --start-server: Serve replicas")
    ap.add_argument(
        "--prefix-routing",
        default="on",
        choices=["on", "off"],
        help="with --num-replicas > 1: the prefix-cache router (on, build_app's default) or Serve's power of two",
    )
    ap.add_argument("--num-cpus-per-replica", type=float, default=None)
    ap.add_argument(
        "--frontends",
        type=int,
        default=None,
        help="with --start-server / --serve-config: HTTP frontend replicas in front of one engine (build_app's "
        "`frontends`, vLLM's --api-server-count; needs the engine on Ray, the GPU default)",
    )
    ap.add_argument("--device", default=None, help="with --start-server: the engine's device (cpu, cuda)")
    a = ap.parse_args()

    if a.http:
        results = http_bench(a)
        if a.workload == "multiturn":
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(results[0]) + "\n")
            return
        print_table(results)
        if a.json:
            with open(a.json, "a") as f:
                for res in results:
                    f.write(json.dumps(res) + "\n")
        if a.plot:
            plot_latency(results, a.plot)
        return
    if a.prompts_file or a.request_rates or a.plot:
        ap.error("--prompts-file, --request-rates and --plot need --http")
    a.num_seqs = a.num_seqs or 256

    from nanovllmx import LLM, SamplingParams

    bw = roofline.copy_bandwidth() if a.bw else None
    llm = LLM(
        a.model,
        max_bs=a.max_bs,
        tp_size=a.tp_size,
        pp_size=a.pp_size,
        executor=a.executor,
        enforce_eager=a.enforce_eager,
        attention_backend=a.attention_backend,
        context_len=a.context_len,
        gpu_memory_utilization=a.gpu_memory_utilization,
        decode_tensor_cores=None if a.decode_tensor_cores is None else bool(a.decode_tensor_cores),
        overlap_scheduling=not a.no_overlap,
        fp8_gemm=a.fp8_gemm,
        pp_inflight_batches=a.pp_inflight_batches,
        tp_allreduce=a.tp_allreduce,
        **({} if a.max_num_batched_tokens is None else {"max_num_batched_tokens": a.max_num_batched_tokens}),
    )
    prompts, params = standard_workload(a.num_seqs)
    if a.decode_only:
        prompts = [p[:16] for p in prompts]
    if a.top_k or a.top_p < 1:  # e.g. Qwen3's generation defaults (top_k 20, top_p 0.95): the filtered sampler
        for p in params:
            p.top_k, p.top_p = a.top_k, a.top_p
    constrained = constrained_indices(a.num_seqs, a.json_schema_frac)
    if constrained:
        from nanovllmx.structured import GrammarSpec

        spec = GrammarSpec.json_schema(BENCH_SCHEMA, "json_schema")
        for i in constrained:
            params[i].structured = spec
        llm.generate(["Benchmark: "], SamplingParams(max_tokens=8, structured=spec), use_tqdm=False)  # compile
    if a.logprobs is not None:  # the cost of logprobs on every request (issue 23); a grammar takes none
        for p in params:
            if p.structured is None:
                p.logprobs = a.logprobs
    llm.generate(["Benchmark: "], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    warm = llm.stats() if a.profile else None  # the profile covers the timed run only (not JIT compiles)
    prof = None
    if a.torch_profile:
        import torch

        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])  # kernels only
        prof.__enter__()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t
    if prof is not None:
        prof.__exit__(None, None, None)
        from nanovllmx.utils.profiling import format_summary, kernel_summary

        rows = kernel_summary(prof, 1)
        busy = sum(r[2] for r in rows) / 1e3
        summary = (
            f"whole run: {dt:.2f} s wall, {busy:.2f} s of kernels ({100 * busy / dt:.0f}% busy)\n"
            + format_summary(rows).replace("/step", "/run")
        )
        print(summary)
        with open(a.torch_profile, "w") as f:
            f.write(summary + "\n\n" + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40))
    total = sum(len(o.token_ids) for o in outs)
    assert total == sum(p.max_tokens for p in params), "every request must produce max_tokens tokens"
    ttft = [o.ttft for o in outs if o.ttft is not None]  # the HTTP rows' TTFT without HTTP, same burst
    res = {
        "executor": a.executor,
        "tokens": total,
        "seconds": round(dt, 3),
        "tok_per_s": round(total / dt, 1),
        "ttft_ms": _latency_ms(ttft),
        "max_bs": a.max_bs,
        "tp": a.tp_size,
        "pp": a.pp_size,
        "tp_allreduce": a.tp_allreduce,
        "eager": a.enforce_eager,
        "overlap": not a.no_overlap,
    }
    if a.max_num_batched_tokens is not None:
        res["max_num_batched_tokens"] = a.max_num_batched_tokens
    if a.decode_only:
        res["decode_only"] = True
    if a.fp8_gemm != "auto":
        res["fp8_gemm"] = a.fp8_gemm
    if a.top_k or a.top_p < 1:
        res.update(top_k=a.top_k, top_p=a.top_p)
    if a.logprobs is not None:
        assert all(
            o.logprobs is not None and len(o.logprobs) == len(o.token_ids)
            for o, p in zip(outs, params)
            if p.structured is None
        )
        res["logprobs"] = a.logprobs
    if constrained:
        eos = set(llm.config.eos_token_ids)
        # tokens sampled while the grammar was still open (before its EOS), of the constrained requests
        open_tokens = sum(
            next((k for k, t in enumerate(outs[i].token_ids) if t in eos), len(outs[i].token_ids)) for i in constrained
        )
        res.update(json_schema_requests=len(constrained), json_schema_open_tokens=open_tokens)
    stats = llm.stats()
    res.update({k: stats[k] for k in ("num_preempted_total", "num_slots") if k in stats})
    if bw and not a.decode_only:
        b = roofline.bound(roofline.Shape.from_config(a.model), bw, num_seqs=a.num_seqs)
        res.update(
            {
                "copy_bw_TBps": round(bw / 1e12, 3),
                "bound_tok_per_s": round(b.tok_per_s),
                "pct_of_bound": round(100 * total / dt / b.tok_per_s, 1),
                # prefill's compute and decode's bytes one after the other (roofline.Bound.serial_seconds)
                "serial_bound_tok_per_s": round(b.serial_tok_per_s),
            }
        )
    if a.profile:
        n0, n1 = warm.get("num_steps") or 0, stats.get("num_steps") or 0
        for key in ("step_ms", "worker_step_ms"):  # per-step means of the timed steps
            before, after = warm.get(key) or {}, stats.get(key)
            res[key] = (
                None
                if after is None
                else {k: round((v * n1 - before.get(k, 0.0) * n0) / max(n1 - n0, 1), 3) for k, v in after.items()}
            )
        res["num_steps"] = n1 - n0
        # the Ray executor's control-plane measures (see RayExecutor.metrics)
        res.update(
            {
                k: stats[k]
                for k in (
                    "control_plane_ms_per_step",
                    "worker_busy_ms_per_step",
                    "control_plane_share",
                    "step_wall_ms",
                    # each pipeline stage's device busy share and ms per step; the lanes in flight
                    "stage_busy_share",
                    "stage_busy_ms_per_step",
                    "pipeline_lanes",
                    "max_inflight_steps",
                    "tp_one_shot_allreduce",
                )
                if stats.get(k) is not None
            }
        )
    print(json.dumps(res))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(res) + "\n")
    llm.shutdown()


if __name__ == "__main__":
    main()
