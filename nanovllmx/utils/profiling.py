"""Benchmark helpers: time a GPU call with CUDA events, and group a torch.profiler run's kernels by
what they do (attention, GEMM, norms, ...) so a benchmark can say where a step's device time goes.
Used by `bench.py --torch-profile` and the kernel benchmarks in `benchmarks/`."""

from __future__ import annotations

from collections.abc import Callable


def cuda_time(fn: Callable[[], object], iters: int = 30) -> float:
    """Seconds per call of fn on the current CUDA stream (3 warm-up calls, then iters timed)."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters * 1e-3


def graph_time(fn: Callable[[], object], iters: int = 30) -> float:
    """Seconds per replay of fn's work captured in a CUDA graph (one warm-up call first, which also
    runs any JIT compile or autotuning outside the capture)."""
    import torch

    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return cuda_time(g.replay, iters)


# first matching substring (lower-cased kernel name) wins
_CATEGORIES = (
    ("attention", ("batchdecode", "batchprefill", "flashinfer", "mergestate", "merge_state", "persistent")),
    ("kv_indices", ("_gather_kv_indices",)),
    ("gemm", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "splitkreduce")),
    ("norm", ("_rmsnorm",)),
    ("qk_norm_rope", ("_head_norm_rope", "_qk_norm_rope")),
    ("kv_store", ("_store_kv",)),
    ("silu_mul", ("_silu_mul",)),
    ("sampling", ("_block_lse", "_pick", "argmax", "topk", "sort", "softmax", "exponential", "philox")),
    ("embedding", ("embedding", "index_select")),
    ("copy/fill", ("copy", "fill", "memcpy", "memset", "elementwise", "vectorized")),
)


def categorize(name: str) -> str:
    low = name.lower()
    for cat, keys in _CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def kernel_summary(prof, steps: int) -> list[tuple[str, int, float]]:
    """[(category, kernels per step, device ms per step)], largest first, from a finished
    torch.profiler.profile; `steps` divides the totals."""
    totals: dict[str, list[float]] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None)
        if t is None:
            t = getattr(ev, "self_cuda_time_total", 0.0)
        if not t or "CUDA" not in str(getattr(ev, "device_type", "")):  # kernels, not the ops that launch them
            continue
        c = totals.setdefault(categorize(ev.key), [0, 0.0])
        c[0] += ev.count
        c[1] += t
    rows = [(cat, round(n / steps), us / 1e3 / steps) for cat, (n, us) in totals.items()]
    return sorted(rows, key=lambda r: -r[2])


def format_summary(rows: list[tuple[str, int, float]]) -> str:
    total = sum(r[2] for r in rows)
    lines = [f"{'category':14s} {'kernels/step':>12s} {'ms/step':>9s} {'share':>6s}"]
    for cat, n, ms in rows:
        lines.append(f"{cat:14s} {n:12d} {ms:9.3f} {100 * ms / max(total, 1e-9):5.1f}%")
    lines.append(f"{'total':14s} {sum(r[1] for r in rows):12d} {total:9.3f}")
    return "\n".join(lines)
