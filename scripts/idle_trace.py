"""Where the GPU waits. docs/benchmarks.md measured 7-9% of the standard run idle; this says where.

1. The whole run with two CUDA events per step (no profiler, so the run keeps its speed): the GPU
   idles between step N's last work and step N+1's first; each such gap is charged to the step kind
   (prefill / decode by batch size) and to what the engine thread was doing when the GPU ran dry.
2. torch.profiler (CPU + CUDA) over windows of engine steps, with the engine's phases labelled
   (schedule, launch, wait, update, output thread), charging every gap between kernels longer than
   --min-gap-us to the engine phase running then, and listing CUDA synchronisations.

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


class _HostEvent:
    """A CUDA event's stand-in on the CPU, where the work is done when the call returns."""

    def __init__(self, **_):
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, other: _HostEvent) -> float:
        return (other.t - self.t) * 1e3


def step_gaps(llm, prompts, params, min_gap_us: float) -> None:
    """Pass 1: the standard run with an event before and after each step's device work; prints the
    GPU's idle time by step kind and by the engine phase running when each gap began."""
    import torch

    from nanovllmx.scheduler.scheduler import Scheduler
    from nanovllmx.worker import model_runner

    cuda = torch.cuda.is_available()
    Event = torch.cuda.Event if cuda else _HostEvent
    steps, phases = [], []  # (kind, e0, e1); (name, t0, t1) on the engine thread
    saved = []  # (object, attribute, original): put back after the run

    def patch(obj, attr, fn) -> None:
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, fn)

    def timed(obj, attr, name) -> None:
        fn = getattr(obj, attr)

        def wrapped(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases.append((name, t0, time.perf_counter()))

        patch(obj, attr, wrapped)

    run_fn = model_runner.ModelRunner.execute

    def execute(self, b, *a, **k):
        t0 = time.perf_counter()
        e0, e1 = Event(enable_timing=True), Event(enable_timing=True)
        e0.record()
        out = run_fn(self, b, *a, **k)
        e1.record()
        phases.append(("launch", t0, time.perf_counter()))
        bs = b.num_reqs
        kind = (
            "prefill"
            if not b.is_decode
            else f"decode {'1-16' if bs <= 16 else '17-64' if bs <= 64 else '65-128' if bs <= 128 else '129-256'}"
        )
        steps.append((kind, e0, e1))
        return out

    patch(model_runner.ModelRunner, "execute", execute)
    timed(Scheduler, "schedule", "schedule")
    timed(Scheduler, "update", "update")
    timed(model_runner.SampledTokens, "result", "wait")
    if cuda:
        torch.cuda.synchronize()
    ref = Event(enable_timing=True)
    ref.record()
    if cuda:
        ref.synchronize()
    t_ref = time.perf_counter()  # host time of `ref` (the GPU was idle: it completed at once)
    t0 = time.perf_counter()
    try:
        llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        if cuda:
            torch.cuda.synchronize()
    finally:
        for obj, attr, fn in reversed(saved):
            setattr(obj, attr, fn)

    def host(e) -> float:
        return t_ref + ref.elapsed_time(e) / 1e3

    by_kind: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])  # steps, busy ms, idle ms
    gaps = []
    for i, (kind, e0, e1) in enumerate(steps):
        row = by_kind[kind]
        row[0] += 1
        row[1] += e0.elapsed_time(e1)
        if i:
            gap = steps[i - 1][2].elapsed_time(e0) * 1e3
            if gap > min_gap_us:
                row[2] += gap / 1e3
                gaps.append((host(steps[i - 1][2]) * 1e6, host(e0) * 1e6))
    busy = sum(r[1] for r in by_kind.values())
    idle = sum(r[2] for r in by_kind.values())
    first = host(steps[0][1]) - t0 if steps else 0.0
    last = t0 + wall - host(steps[-1][2]) if steps else 0.0
    print(
        f"events pass: wall {wall * 1e3:.0f} ms, GPU busy {busy:.0f} ms, idle between steps {idle:.0f} ms "
        f"({idle / wall / 10:.1f}%), before the first step {first * 1e3:.0f} ms, after the last {last * 1e3:.0f} ms"
    )
    print(f"{'step kind':16s} {'steps':>6s} {'busy ms':>9s} {'idle ms':>8s} {'idle/step ms':>12s}")
    for kind in sorted(by_kind):
        n, b_ms, i_ms = by_kind[kind]
        print(f"{kind:16s} {n:6d} {b_ms:9.1f} {i_ms:8.1f} {i_ms / n:12.3f}")
    by = charge(gaps, [(n, a * 1e6, b * 1e6) for n, a, b in phases])
    print(
        "idle by engine phase at the gap's start (ms): "
        + ", ".join(f"{k} {v / 1e3:.1f}" for k, v in sorted(by.items(), key=lambda kv: -kv[1]))
    )
    dur: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for n, a, b in phases:
        dur[n][0] += 1
        dur[n][1] += (b - a) * 1e3
    print("engine thread, mean ms per call: " + ", ".join(f"{k} {v[1] / v[0]:.3f} (x{v[0]})" for k, v in dur.items()))


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
    windows = [tuple(int(x) for x in w.split(":")) for w in a.windows.split(",") if w]
    # the engine's phases, as the engine thread runs them
    from nanovllmx.scheduler.scheduler import Scheduler

    # no prefix caching: the profiled second run must prefill as the first did (the same prompts)
    llm = LLM(a.model, max_bs=256, context_len=4096, device=a.device, enable_prefix_caching=False)
    prompts, params = standard_workload(a.num_seqs)
    llm.generate(["warm-up"], params[0].__class__(max_tokens=4), use_tqdm=False)
    step_gaps(llm, prompts, params, a.min_gap_us)
    _label(Scheduler, "schedule", "nvx.schedule")
    _label(Scheduler, "update", "nvx.update")
    _label(core_mod.EngineCore, "_launch", "nvx.launch")
    _label(model_runner.SampledTokens, "result", "nvx.wait")
    _label(llm.processor, "process", "nvx.output_thread")
    state = {"step": 0}
    step = core_mod.EngineCore.step

    def counted_step(self):
        state["step"] += 1
        return step(self)

    core_mod.EngineCore.step = counted_step
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
        prof = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
            experimental_config=_profiler_config(),
        )
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
    print(
        f"{'steps':>9s} {'wall ms':>8s} {'kernels ms':>10s} {'idle ms':>8s} {'gaps':>5s} {'labels':>6s}  "
        f"idle by engine phase at the gap's start (ms)"
    )
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
