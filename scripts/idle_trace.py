"""Where the GPU waits. Runs the standard workload in-process under torch.profiler (CPU + CUDA) for
windows of engine steps, with the engine's phases labelled (schedule, launch, wait, update, output
thread), and charges every gap between kernels longer than --min-gap-us to what the engine thread
was doing when the GPU ran dry. docs/benchmarks.md measured 7-9% of the run idle; this says where.

    python scripts/idle_trace.py --model /tmp/q06 [--windows 5:35,300:330,900:960] [--min-gap-us 5]
"""
from __future__ import annotations

import argparse
import bisect
import os
import sys
import threading
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

Span = tuple[float, float]  # start, end in µs


def idle_gaps(kernels: list[Span], min_gap: float) -> list[Span]:
    """Spans longer than min_gap where no kernel runs, between the first and the last kernel."""
    gaps, end = [], None
    for s, e in sorted(kernels):
        if end is not None and s - end > min_gap:
            gaps.append((end, s))
        end = e if end is None else max(end, e)
    return gaps


def charge(gaps: list[Span], labels: list[tuple[str, float, float]]) -> dict[str, float]:
    """µs of gap per label active when each gap starts (the innermost, i.e. latest-starting, label
    covering that instant); 'none' where no label covers it."""
    labels = sorted(labels, key=lambda x: x[1])
    starts = [x[1] for x in labels]
    out: dict[str, float] = defaultdict(float)
    for g0, g1 in gaps:
        i = bisect.bisect_right(starts, g0)
        name = "none"
        for j in range(i - 1, max(i - 64, -1), -1):  # nearest labels starting before the gap
            if labels[j][2] >= g0:
                name = labels[j][0]
                break
        out[name] += g1 - g0
    return dict(out)


def _profiler_config():
    """Record the engine's and the output thread's ops too (the profiler runs on this thread), and
    the CUDA stream/event synchronisations (a hidden sync in a launch would show here)."""
    from torch._C._profiler import _ExperimentalConfig
    try:
        return _ExperimentalConfig(profile_all_threads=True, enable_cuda_sync_events=True)
    except TypeError:  # an older torch
        return _ExperimentalConfig(enable_cuda_sync_events=True)


def _label(obj, attr: str, name: str) -> None:
    import torch
    fn = getattr(obj, attr)

    def wrapped(*a, **k):
        with torch.profiler.record_function(name):
            return fn(*a, **k)
    setattr(obj, attr, wrapped)


def main() -> None:
    import torch

    from bench import standard_workload
    from nanovllmx import LLM
    from nanovllmx.engine import core as core_mod
    from nanovllmx.worker import model_runner
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--windows", default="5:35,300:330,900:960", help="engine steps a:b to profile")
    ap.add_argument("--min-gap-us", type=float, default=5.0)
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    windows = [tuple(int(x) for x in w.split(":")) for w in a.windows.split(",")]
    # the engine's phases, as the engine thread runs them
    from nanovllmx.scheduler.scheduler import Scheduler
    _label(Scheduler, "schedule", "nvx.schedule")
    _label(Scheduler, "update", "nvx.update")
    _label(core_mod.EngineCore, "_launch", "nvx.launch")
    _label(model_runner.SampledTokens, "result", "nvx.wait")
    llm = LLM(a.model, max_bs=256, context_len=4096, device=a.device)
    _label(llm.processor, "process", "nvx.output_thread")
    state = {"step": 0}
    step = core_mod.EngineCore.step

    def counted_step(self):
        state["step"] += 1
        return step(self)

    core_mod.EngineCore.step = counted_step
    prompts, params = standard_workload(a.num_seqs)
    llm.generate(["warm-up"], params[0].__class__(max_tokens=4), use_tqdm=False)
    state["step"] = 0
    # the profiler starts and stops on this (its registering) thread while the run goes on in another
    run = threading.Thread(target=llm.generate, args=(prompts, params), kwargs={"use_tqdm": False})
    run.start()
    results = []
    for s0, s1 in windows:
        while state["step"] < s0 and run.is_alive():
            time.sleep(2e-4)
        if not run.is_alive():
            break
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                  torch.profiler.ProfilerActivity.CUDA],
                                      experimental_config=_profiler_config())
        prof.start()
        first = state["step"]
        while state["step"] < s1 and run.is_alive():
            time.sleep(2e-4)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof.stop()
        results.append(((first, state["step"]), prof.events()))
    run.join()
    llm.shutdown()
    engine = None
    print(f"{'steps':>9s} {'wall ms':>8s} {'kernels ms':>10s} {'idle ms':>8s} {'gaps':>5s} {'labels':>6s}  "
          f"idle by engine phase at the gap's start (ms)")
    for (s0, s1), events in results:
        device = [e for e in events if "CUDA" in str(e.device_type)]
        syncs = [e for e in device if "sync" in e.name.lower()]
        kern = [(e.time_range.start, e.time_range.end) for e in device if "sync" not in e.name.lower()]
        labs = [(e.name, e.time_range.start, e.time_range.end, e.thread) for e in events if e.name.startswith("nvx.")]
        if engine is None:  # the engine thread is the one that launches
            engine = next((t for n, _, _, t in labs if n == "nvx.launch"), threading.get_ident())
        gaps = idle_gaps(kern, a.min_gap_us)
        by = charge(gaps, [(n, s, e) for n, s, e, t in labs if t == engine])
        wall = (max(e for _, e in kern) - min(s for s, _ in kern)) / 1e3 if kern else 0.0
        busy = sum(e - s for s, e in kern) / 1e3
        idle = sum(g1 - g0 for g0, g1 in gaps) / 1e3
        parts = ", ".join(f"{k} {v / 1e3:.2f}" for k, v in sorted(by.items(), key=lambda kv: -kv[1]))
        print(f"{s0:>4d}:{s1:<4d} {wall:8.1f} {busy:10.1f} {idle:8.1f} {len(gaps):5d} {len(labs):6d}  {parts}")
        sync_by: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for e in syncs:
            sync_by[e.name][0] += 1
            sync_by[e.name][1] += (e.time_range.end - e.time_range.start) / 1e3
        if sync_by:
            print("           syncs: " + ", ".join(f"{k} x{n} {ms:.2f} ms" for k, (n, ms) in sync_by.items()))


if __name__ == "__main__":
    main()
