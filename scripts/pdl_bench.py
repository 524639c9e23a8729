"""Does programmatic dependent launch (PDL) shave the per-kernel floor of a decode step? A decode
step is ~400 small kernels in one CUDA graph; each costs a few microseconds beyond its bytes
(docs/benchmarks.md, 4th session: every layer GEMM takes 5.3-8.8 us whatever its size). With PDL a
kernel is launched before the one it depends on has finished and waits on-device (griddepcontrol)
before touching that kernel's output, so its launch and prologue overlap the other's tail.

Two chains of 28 "layers", each captured in a CUDA graph, by batch size M:
  gemm+norm: a cuBLAS GEMM [M,1024]x[1024,1024] then a Triton RMSNorm of its output (our fused
             kernels sit between cuBLAS GEMMs like this), the norm launched plainly or with PDL;
  norm+norm: two Triton RMSNorms back to back, plainly or both with PDL (the first signalling
             its dependents at once).
Prints microseconds per step and the saving per kernel boundary. Not run yet (written when the
4th session's device time was spent).

    python scripts/pdl_bench.py [--sizes 16,64,256]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LAYERS, H = 28, 1024


@triton.jit
def _norm(x, w, out, eps, N: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, N)
    wt = tl.load(w + c).to(tl.float32)  # weights are not the previous kernel's output: before the wait
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may launch now (it waits for our end)
        tl.extra.cuda.gdc_wait()  # the previous kernel's output is complete and visible after this
    v = tl.load(x + row * N + c).to(tl.float32)
    r = tl.rsqrt(tl.sum(v * v, axis=0) / N + eps)
    tl.store(out + row * N + c, (v * r * wt).to(out.dtype.element_ty))


def norm(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, pdl: bool) -> None:
    _norm[(x.shape[0],)](x, w, out, 1e-6, N=H, PDL=pdl, num_warps=4, launch_pdl=pdl)


def main() -> None:
    from nanovllmx.utils.profiling import graph_time
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="16,64,256")
    a = ap.parse_args()
    dt, dev = torch.bfloat16, "cuda"
    ws = [torch.randn(H, H, dtype=dt, device=dev) * 0.02 for _ in range(LAYERS)]
    nw = torch.ones(H, dtype=dt, device=dev)

    def graph_us(fn) -> float:
        return graph_time(fn, 50) * 1e6

    print(f"{'M':>4s} {'gemm+norm':>10s} {'+PDL':>8s} {'us/bnd':>7s} {'norm+norm':>10s} {'+PDL':>8s} {'us/bnd':>7s}  (us per step)")
    for m in (int(s) for s in a.sizes.split(",")):
        x = torch.randn(m, H, dtype=dt, device=dev)
        h = torch.empty_like(x)
        y = torch.empty_like(x)

        def gemm_norm(pdl: bool):
            def fn():
                for w in ws:
                    torch.matmul(x, w.t(), out=h)
                    norm(h, nw, x, pdl)
            return fn

        def norm_norm(pdl: bool):
            def fn():
                for _ in ws:
                    norm(x, nw, y, pdl)
                    norm(y, nw, x, pdl)
            return fn
        ref = x.clone()
        gemm_norm(False)()
        plain = x.clone()
        x.copy_(ref)
        gemm_norm(True)()
        assert torch.equal(plain, x), "PDL changed the result: a wait is missing"
        x.copy_(ref)
        t = [graph_us(gemm_norm(False)), graph_us(gemm_norm(True)), graph_us(norm_norm(False)), graph_us(norm_norm(True))]
        print(f"{m:4d} {t[0]:10.1f} {t[1]:8.1f} {(t[0] - t[1]) / LAYERS:7.2f} {t[2]:10.1f} {t[3]:8.1f} "
              f"{(t[2] - t[3]) / (2 * LAYERS):7.2f}")


if __name__ == "__main__":
    main()
