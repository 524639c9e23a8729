"""The weight-only FP8 GEMM (kernels/fp8_linear.py) against bf16 cuBLAS on the Qwen3-8B decode
shapes, by batch size, with a sweep of its tiles: which (BLOCK_M, BLOCK_N, warps, stages) is
fastest per M, and how far the default choice (default_tiles) is from it. Each GEMM cycles
through LAYERS distinct weights, so nothing stays in L2 (as in a decode step), timed in a CUDA graph.

    python -m benchmarks.fp8_gemm_bench [--sizes 16,64,128,256]
"""

from __future__ import annotations

import argparse

import torch

# (name, in, out) of one Qwen3-8B layer: q,k,v fused; gate,up fused
SHAPES = (("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 24576), ("down", 12288, 4096))
LAYERS = 8


def candidates(m: int) -> list[tuple[int, int, int, int]]:
    """Two row tiles at most (those that fit M), three column tiles; warps and stages by tile area."""
    bms = [b for b in (16, 32, 64, 128, 256) if b <= max(16, m)][-2:]
    return [(bm, bn, 4 if bm * bn <= 8192 else 8, 4 if bm * bn <= 8192 else 3) for bm in bms for bn in (64, 128, 256)]


def _bf16_us(x: torch.Tensor, ws: list[torch.Tensor]) -> float:
    from nanovllmx.utils.profiling import graph_time

    return graph_time(lambda: [torch.matmul(x, w.t()) for w in ws]) / len(ws) * 1e6


def _fp8_us(x: torch.Tensor, ws: list[tuple[torch.Tensor, torch.Tensor]], tiles: tuple[int, int, int, int]) -> float:
    from nanovllmx.kernels.fp8_linear import w8_linear
    from nanovllmx.utils.profiling import graph_time

    return graph_time(lambda: [w8_linear(x, q, s, (128, 128), tiles=tiles) for q, s in ws]) / len(ws) * 1e6


def main() -> None:
    from benchmarks.roofline import copy_bandwidth
    from nanovllmx.kernels.fp8_linear import default_tiles
    from nanovllmx.layers.fp8 import quantize_block_fp8
    from nanovllmx.models.checkpoint import Fp8Scheme

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="16,64,128,256")
    a = ap.parse_args()
    bw = copy_bandwidth()
    dt = torch.bfloat16
    block = Fp8Scheme(128, 128)
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s")
    cols = ("shape", "M", "bf16 us", "fp8 bound", "default us", "best us", "best (bm, bn, warps, stages)")
    print(f"{cols[0]:8s} " + " ".join(f"{c:>10s}" for c in cols[1:6]) + f"  {cols[6]}")
    for name, k, n in SHAPES:
        w16 = [torch.randn(n, k, dtype=dt, device="cuda") * 0.02 for _ in range(LAYERS)]
        w8 = [quantize_block_fp8(w, block) for w in w16]
        for m in (int(s) for s in a.sizes.split(",")):
            x = torch.randn(m, k, dtype=dt, device="cuda")
            bf16 = _bf16_us(x, w16)
            best_t = default_tiles(m, n)
            dflt = best = _fp8_us(x, w8, best_t)
            for t in candidates(m):
                try:
                    us = _fp8_us(x, w8, t)
                except Exception:  # out of shared memory or registers for this tile
                    continue
                if us < best:
                    best, best_t = us, t
            bound = n * k / bw * 1e6  # the FP8 weight's bytes at the copy bandwidth
            print(f"{name:8s} {m:>10d} {bf16:10.1f} {bound:10.1f} {dflt:10.1f} {best:10.1f}  {best_t}", flush=True)


if __name__ == "__main__":
    main()
