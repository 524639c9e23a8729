"""The standard workload's prefill alone: its 256 prompts (143k tokens) with one output token each,
timed, then again under torch.profiler: kernel time by category and the largest kernels. #5: the
prefill steps took ~0.5 s of the ~7 s run, where their GEMM FLOPs need ~0.2 s at the bf16 peak.

    python scripts/prefill_bench.py --model /tmp/q06 [--chunk 16384]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    import torch

    from bench import standard_workload
    from nanovllmx import LLM, SamplingParams
    from nanovllmx.utils.profiling import format_summary, kernel_summary

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--chunk", type=int, default=None, help="max_num_batched_tokens (default: the engine's)")
    a = ap.parse_args()
    kw = {} if a.chunk is None else {"max_num_batched_tokens": a.chunk}
    # no prefix caching: the profiled second pass must prefill as the first did
    llm = LLM(a.model, max_bs=256, context_len=4096, enable_prefix_caching=False, **kw)
    prompts, _ = standard_workload()
    one = SamplingParams(max_tokens=1, temperature=0.6, ignore_eos=True)
    llm.generate(["warm-up"], one, use_tqdm=False)
    n = sum(len(p) for p in prompts)
    t = time.perf_counter()
    llm.generate(prompts, one, use_tqdm=False)
    dt = time.perf_counter() - t
    print(
        f"prefill of {n} prompt tokens (chunk {llm.config.max_num_batched_tokens}): {dt * 1e3:.0f} ms, "
        f"{n / dt:,.0f} tok/s"
    )
    if not torch.cuda.is_available():
        return llm.shutdown()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, one, use_tqdm=False)
    print(format_summary(kernel_summary(prof, 1)).replace("/step", "/run"))
    evs = sorted(
        (e for e in prof.key_averages() if "CUDA" in str(e.device_type)), key=lambda e: -e.self_device_time_total
    )
    for e in evs[:10]:
        print(f"{e.self_device_time_total / 1e3:8.1f} ms {e.count:6d}x  {e.key[:110]}")
    llm.shutdown()


if __name__ == "__main__":
    main()
