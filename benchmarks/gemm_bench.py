"""The decode step's GEMMs (Qwen3-0.6B shapes) by batch size, as the model runs them: 28 layers of
distinct weights (so nothing stays in L2) captured in one CUDA graph, cuBLAS as PyTorch picks it,
timed per step, against the layers' weights at the copy bandwidth.

The open question it answers (docs/benchmarks.md, "Next"): the decode GEMMs sit at a per-kernel
latency floor (5-9 us per GEMM whatever M is: ~0.7-0.8 ms a step against ~0.2-0.3 ms of weights).
A change that attacks the floor (two micro-batches on two streams: benchmarks/overlap_bench.py and
branch microbatch) should move the 'cublas' column of a whole step or beat it. (TunableOp and a
split-K Triton GEMM were tried here and found nothing better: docs/benchmarks-history.md.)

    python -m benchmarks.gemm_bench [--sizes 16,64,128,256]
"""

from __future__ import annotations

import argparse

import torch

# (name, in, out) per layer, as Qwen3-0.6B's linear layers (q,k,v fused; gate,up fused)
SHAPES = (("qkv", 1024, 4096), ("o", 2048, 1024), ("gate_up", 1024, 6144), ("down", 3072, 1024))
LAYERS = 28


def main() -> None:
    from benchmarks.roofline import copy_bandwidth
    from nanovllmx.utils.profiling import graph_time

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="16,32,64,128,256")
    a = ap.parse_args()
    bw = copy_bandwidth()
    dt = torch.bfloat16
    weights = {n: [torch.randn(o, i, dtype=dt, device="cuda") * 0.02 for _ in range(LAYERS)] for n, i, o in SHAPES}
    lm_head = torch.randn(151936, 1024, dtype=dt, device="cuda") * 0.02
    sizes = [int(s) for s in a.sizes.split(",")]
    xs = {m: {n: torch.randn(m, i, dtype=dt, device="cuda") for n, i, _ in SHAPES} for m in sizes}
    outs = {m: {n: torch.empty(m, o, dtype=dt, device="cuda") for n, _, o in SHAPES} for m in sizes}
    x_head = {m: torch.randn(m, 1024, dtype=dt, device="cuda") for m in sizes}

    def run_cublas(m, names):
        def fn():
            for n in names:
                for w in weights[n]:
                    torch.matmul(xs[m][n], w.t(), out=outs[m][n])

        return fn

    names = [n for n, _, _ in SHAPES]
    layer_bytes = sum(LAYERS * i * o * 2 for _, i, o in SHAPES)
    head_bytes = lm_head.numel() * 2
    print(
        f"copy bandwidth {bw / 1e12:.3f} TB/s; {LAYERS} layers of {', '.join(names)}: {layer_bytes / 1e9:.3f} GB "
        f"(at the copy bandwidth {layer_bytes / bw * 1e3:.3f} ms), lm_head {head_bytes / 1e6:.0f} MB"
    )
    rows = []
    for m in sizes:
        row = {"M": m, "bound": layer_bytes / bw * 1e3}
        row["cublas"] = graph_time(run_cublas(m, names)) * 1e3
        for n in names:
            row[f"cublas {n}"] = graph_time(run_cublas(m, [n])) * 1e3
        row["cublas lm_head"] = graph_time(lambda m=m: torch.matmul(x_head[m], lm_head.t())) * 1e3
        rows.append(row)
    keys = [k for k in rows[0] if k != "M"]
    print("ms per decode step (all 28 layers of the shape; 'bound' = the layers' weights at the copy bandwidth)")
    print(f"{'M':>4s} " + " ".join(f"{k:>15s}" for k in keys))
    for row in rows:
        print(f"{row['M']:>4d} " + " ".join(f"{row.get(k, float('nan')):15.3f}" for k in keys))


if __name__ == "__main__":
    main()
