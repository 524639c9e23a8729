"""Throughput benchmark on the standard workload (as in nano-vllm / Nano-vLLM-X): 256 requests,
prompt and output lengths uniform in 100..1024 (random.seed(0): 133,966 output tokens),
temperature 0.6, ignore_eos, all submitted at once.

  python bench.py --model /path/to/qwen3-0.6b                 # offline, through LLM.generate
  python bench.py --model M --bw                              # also measure copy bandwidth + roofline bound
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from random import randint, seed


def standard_workload(num_seqs: int = 256, max_in: int = 1024, max_out: int = 1024):
    """Same draw order as the seed's bench.py and ../shared/roofline.py."""
    from nanovllmx import SamplingParams
    seed(0)
    prompts = [[randint(0, 10000) for _ in range(randint(100, max_in))] for _ in range(num_seqs)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(100, max_out)) for _ in range(num_seqs)]
    return prompts, params


def copy_bandwidth() -> float:
    """Device memory bandwidth (bytes read + written per second) of a large copy."""
    import torch
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    iters = 20
    t = time.perf_counter()
    for _ in range(iters):
        b.copy_(a)
    torch.cuda.synchronize()
    bw = 2 * n * iters / (time.perf_counter() - t)
    del a, b
    torch.cuda.empty_cache()
    return bw


def roofline_bound(bw: float, path: str | None) -> float | None:
    """Tokens/s bound from the shared roofline script (output tokens / lower-bound seconds)."""
    import re
    import subprocess
    for p in [path, os.path.join(os.path.dirname(__file__), "..", "shared", "roofline.py"), ".device/roofline.py"]:
        if p and os.path.exists(p):
            out = subprocess.run([sys.executable, p, "--bw", str(bw)], capture_output=True, text=True).stdout
            m = re.search(r"= (\d+) output tok/s", out)
            return float(m.group(1)) if m else None
    return None


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


async def _http_run(base: str, model: str, prompts, params, concurrency: int | None, rate: float | None,
                    timeout: float = 3600.0) -> dict:
    """Send the workload to /v1/completions (streaming) and time every request."""
    import asyncio
    import random

    import httpx

    sem = asyncio.Semaphore(concurrency or len(prompts))
    ttft, itl, e2e, out_tokens, errors = [], [], [], [], []
    limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=len(prompts) + 8)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as client:
        async def one(p, sp):
            body = {"model": model, "prompt": p, "max_tokens": sp.max_tokens, "temperature": sp.temperature,
                    "ignore_eos": sp.ignore_eos, "stream": True, "stream_options": {"include_usage": True}}
            async with sem:
                t0 = time.perf_counter()
                last, n = None, 0
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {(await r.aread())[:200]!r}")
                        return
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        ev = json.loads(line[6:])
                        now = time.perf_counter()
                        if ev.get("usage"):
                            n = ev["usage"]["completion_tokens"]
                        if ev.get("choices"):
                            if last is None:
                                ttft.append(now - t0)
                            else:
                                itl.append(now - last)
                            last = now
                e2e.append(time.perf_counter() - t0)
                out_tokens.append(n)

        tasks = []
        for p, sp in zip(prompts, params):
            tasks.append(asyncio.create_task(one(p, sp)))
            if rate:
                await asyncio.sleep(random.expovariate(rate))
        await asyncio.gather(*tasks)
    ms = lambda xs: {f"p{q}": round(1e3 * _pct(xs, q), 1) for q in (50, 90, 99)}
    return {"ttft_ms": ms(ttft), "itl_ms": ms(itl), "e2e_s": {k: v / 1e3 for k, v in ms(e2e).items()},
            "completion_tokens": sum(out_tokens), "errors": len(errors), "first_error": errors[0] if errors else None}


def http_bench(a) -> dict:
    """Through the Serve app: start it here (--start-server) or use one running at --url."""
    import asyncio

    import httpx
    server = None
    if a.start_server:
        from ray import serve

        from nanovllmx.serve import build_app
        args = {"model": a.model, "max_bs": a.max_bs, "context_len": a.context_len, "tp_size": a.tp_size,
                "pp_size": a.pp_size, "enforce_eager": a.enforce_eager,
                "gpu_memory_utilization": a.gpu_memory_utilization}
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        server = serve.run(build_app(args), name="bench", route_prefix="/")
    model = httpx.get(a.url + "/v1/models", timeout=60).json()["data"][0]["id"]
    prompts, params = standard_workload(a.num_seqs)
    asyncio.run(_http_run(a.url, model, [[1, 2, 3]], [params[0].__class__(max_tokens=8)], None, None))  # warm-up
    t = time.perf_counter()
    res = asyncio.run(_http_run(a.url, model, prompts, params, a.concurrency, a.request_rate))
    dt = time.perf_counter() - t
    res.update({"mode": "http", "seconds": round(dt, 3), "tok_per_s": round(res["completion_tokens"] / dt, 1),
                "request_rate": a.request_rate, "concurrency": a.concurrency})
    if server is not None:
        from ray import serve
        serve.shutdown()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--max-bs", type=int, default=256)
    ap.add_argument("--tp-size", type=int, default=1)
    ap.add_argument("--pp-size", type=int, default=1)
    ap.add_argument("--executor", default="auto")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--context-len", type=int, default=4096)
    ap.add_argument("--bw", action="store_true", help="measure copy bandwidth and print the roofline bound")
    ap.add_argument("--roofline", default=None, help="path to roofline.py (default: ../shared/roofline.py)")
    ap.add_argument("--no-overlap", action="store_true", help="schedule each step only after the previous one")
    ap.add_argument("--decode-tensor-cores", type=int, default=None, choices=[0, 1])
    ap.add_argument("--torch-profile", default=None, help="write a torch.profiler kernel table of the run here")
    ap.add_argument("--profile", action="store_true", help="print the per-step time breakdown")
    ap.add_argument("--json", default=None, help="append the result as a JSON line to this file")
    ap.add_argument("--http", action="store_true", help="send the workload through the OpenAI HTTP API")
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--start-server", action="store_true", help="with --http: serve.run the app for --model here")
    ap.add_argument("--request-rate", type=float, default=None, help="with --http: Poisson arrivals per second")
    ap.add_argument("--concurrency", type=int, default=None, help="with --http: most requests in flight")
    a = ap.parse_args()

    if a.http:
        res = http_bench(a)
        print(json.dumps(res))
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(res) + "\n")
        return

    from nanovllmx import LLM, SamplingParams
    bw = copy_bandwidth() if a.bw else None
    llm = LLM(a.model, max_bs=a.max_bs, tp_size=a.tp_size, pp_size=a.pp_size, executor=a.executor,
              enforce_eager=a.enforce_eager, attention_backend=a.attention_backend, context_len=a.context_len,
              gpu_memory_utilization=a.gpu_memory_utilization,
              decode_tensor_cores=None if a.decode_tensor_cores is None else bool(a.decode_tensor_cores),
              overlap_scheduling=not a.no_overlap)
    prompts, params = standard_workload(a.num_seqs)
    llm.generate(["Benchmark: "], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    prof = None
    if a.torch_profile:
        import torch
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
        prof.__enter__()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t
    if prof is not None:
        prof.__exit__(None, None, None)
        with open(a.torch_profile, "w") as f:
            f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
    total = sum(len(o.token_ids) for o in outs)
    assert total == sum(p.max_tokens for p in params), "every request must produce max_tokens tokens"
    res = {"tokens": total, "seconds": round(dt, 3), "tok_per_s": round(total / dt, 1), "max_bs": a.max_bs,
           "tp": a.tp_size, "pp": a.pp_size, "eager": a.enforce_eager, "overlap": not a.no_overlap}
    stats = llm.stats()
    res.update({k: stats[k] for k in ("num_preempted_total", "num_slots") if k in stats})
    if bw:
        bound = roofline_bound(bw, a.roofline)
        res.update({"copy_bw_TBps": round(bw / 1e12, 3), "bound_tok_per_s": bound,
                    "pct_of_bound": round(100 * total / dt / bound, 1) if bound else None})
    if a.profile:
        res["step_ms"] = stats.get("step_ms")
        res["worker_step_ms"] = stats.get("worker_step_ms")
        res["num_steps"] = stats.get("num_steps")
    print(json.dumps(res))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(res) + "\n")
    llm.shutdown()


if __name__ == "__main__":
    main()
