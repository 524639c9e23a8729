"""Measure the distributed engine's per-step control-plane cost.

    python -m nanovllmx.distributed.bench MODEL --tp 2 --pp 1 --batch 32 --tokens 64 [--mode socket|ray]

Prints the stats() timings: control_plane_ms_per_step (a worker's gap between finishing step N
and starting step N+1), its split into scheduler time and transport, worker busy time and the
control plane's share of the step. Decode-dominated: prompts are short, outputs fixed-length.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--mode", default="socket", choices=["socket", "ray"])
    ap.add_argument("--context-len", type=int, default=512)
    ap.add_argument("--microbatches", type=int, default=None, help="pp_microbatches (default: pp_size)")
    ap.add_argument("--no-overlap", action="store_true", help="overlap_scheduling=False")
    ap.add_argument("--executor", default="ray", choices=["ray", "local"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--num-cpus", type=int, default=None, help="ray.init(num_cpus=...) if we start Ray")
    a = ap.parse_args(argv)
    from nanovllmx import LLM, SamplingParams

    kw: dict[str, Any] = {"ray_init_kwargs": {"num_cpus": a.num_cpus}} if a.num_cpus else {}
    kw["overlap_scheduling"] = not a.no_overlap
    t0 = time.perf_counter()
    if a.executor == "ray":
        kw.update(ray_step_mode=a.mode, pp_microbatches=a.microbatches)
    llm = LLM(
        a.model, context_len=a.context_len, tp_size=a.tp, pp_size=a.pp, executor=a.executor, device=a.device, **kw
    )
    t_init = time.perf_counter() - t0
    sp = SamplingParams(temperature=0, max_tokens=a.tokens, ignore_eos=True)
    prompts = [[(i * 7919 + j * 104729) % 150000 for j in range(a.prompt_len)] for i in range(a.batch)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    dt = time.perf_counter() - t0
    st = llm.stats()
    llm.shutdown()
    n = sum(len(o.token_ids) for o in outs)
    res = dict(
        executor=a.executor,
        device=llm.config.device,
        tp=a.tp,
        pp=a.pp,
        batch=a.batch,
        mode=a.mode,
        microbatches=st.get("pp_microbatches"),
        init_s=round(t_init, 2),
        tok_per_s=round(n / dt, 1),
        **{
            k: st.get(k)
            for k in (
                "overlap",
                "num_timed_steps",
                "control_plane_ms_per_step",
                "scheduler_ms_per_step",
                "transport_ms_per_step",
                "worker_busy_ms_per_step",
                "step_wall_ms",
                "control_plane_share",
            )
        },
    )
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
