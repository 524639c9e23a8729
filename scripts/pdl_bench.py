"""Does programmatic dependent launch (PDL) shave the per-kernel floor of a decode step? A decode
step is ~400 small kernels in one CUDA graph; each costs a few microseconds beyond its bytes
(docs/benchmarks.md, 4th session: every layer GEMM takes 5.3-8.8 us whatever its size). With PDL a
kernel is launched before the one it depends on has finished and waits on-device (griddepcontrol)
before touching that kernel's output, so its launch and prologue overlap the other's tail.

Chains of 28 "layers", each captured in a CUDA graph, by batch size M:
  gemm+norm: a cuBLAS GEMM [M,1024]x[1024,1024] then a Triton RMSNorm of its output (our fused
             kernels sit between cuBLAS GEMMs like this), the norm launched plainly or with PDL;
  norm+norm: two Triton RMSNorms back to back, plainly or both with PDL (the first signalling
             its dependents at once);
  layer:     a decode layer's four GEMMs (Qwen3-0.6B: qkv, o, gate_up, down), each followed by a
             norm of its output: cuBLAS + plain norm (as the model runs now), cuBLAS + PDL norm,
             and a split-K Triton GEMM that loads its weight tile *before* waiting on the previous
             kernel (weights are no kernel's output), so with PDL its weight reads overlap the
             norm before it; with and without PDL.
Prints microseconds per step and the saving per kernel boundary.

    python scripts/pdl_bench.py [--sizes 16,64,128,256]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gemm_bench import _store_split  # noqa: E402  (this script's folder is on sys.path)

LAYERS, H = 28, 1024


@triton.jit
def _norm(x, w, out, eps, stride, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    cm = c < N
    wt = tl.load(w + c, mask=cm).to(tl.float32)  # weights are not the previous kernel's output: before the wait
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may launch now (it waits for our end)
        tl.extra.cuda.gdc_wait()  # the previous kernel's output is complete and visible after this
    v = tl.load(x + row * stride + c, mask=cm, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(v * v, axis=0) / N + eps)
    tl.store(out + row * N + c, (v * r * wt).to(out.dtype.element_ty), mask=cm)


def norm(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, pdl: bool) -> None:
    n = out.shape[1]
    _norm[(x.shape[0],)](
        x, w, out, 1e-6, x.stride(0), n, BLOCK=triton.next_power_of_2(n), PDL=pdl, num_warps=4, launch_pdl=pdl
    )


@triton.jit
def _gemm(
    x,
    w,
    out,
    part,
    count,
    M,
    N: tl.constexpr,
    K: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    SPLIT: tl.constexpr,
    PDL: tl.constexpr,
):
    """out[M, N] = x[M, K] @ w[N, K]^T. Program (n, s, m) owns a BN x K/SPLIT weight tile, loaded
    first; the last of a tile's SPLIT programs sums their fp32 partials in split order."""
    pn, ps, pm = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    KL: tl.constexpr = K // SPLIT
    rn = pn * BN + tl.arange(0, BN)
    rk = ps * KL + tl.arange(0, KL)
    b = tl.load(w + rn[None, :] * K + rk[:, None])  # [KL, BN]: independent of earlier kernels
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    rm = pm * BM + tl.arange(0, BM)
    a = tl.load(x + rm[:, None] * K + rk[None, :], mask=rm[:, None] < M, other=0.0)
    _store_split(tl.dot(a, b), out, part, count, rm, rn, M, N, ps, pm, SPLIT)


def gemm(
    x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, part: torch.Tensor, count: torch.Tensor, pdl: bool
) -> None:
    M, K = x.shape
    N = w.shape[0]
    split = max(1, K // 256)
    bn = 64 if N // 64 * split >= 264 else 32
    bm = min(64, max(16, triton.next_power_of_2(M)))
    _gemm[(N // bn, split, triton.cdiv(M, bm))](
        x, w, out, part, count, M, N, K, BM=bm, BN=bn, SPLIT=split, PDL=pdl, num_warps=4, launch_pdl=pdl
    )


SHAPES = ((1024, 4096), (2048, 1024), (1024, 6144), (3072, 1024))  # (in, out): qkv, o, gate_up, down


def main() -> None:
    from nanovllmx.utils.profiling import graph_time

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="16,64,128,256")
    a = ap.parse_args()
    dt, dev = torch.bfloat16, "cuda"
    ws = [torch.randn(H, H, dtype=dt, device=dev) * 0.02 for _ in range(LAYERS)]
    nw = torch.ones(4096, dtype=dt, device=dev)

    def graph_us(fn) -> float:
        return graph_time(fn, 50) * 1e6

    print(
        f"{'M':>4s} {'gemm+norm':>10s} {'+PDL':>8s} {'us/bnd':>7s} {'norm+norm':>10s} {'+PDL':>8s} {'us/bnd':>7s}  (us per step)"
    )
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
        t = [
            graph_us(gemm_norm(False)),
            graph_us(gemm_norm(True)),
            graph_us(norm_norm(False)),
            graph_us(norm_norm(True)),
        ]
        print(
            f"{m:4d} {t[0]:10.1f} {t[1]:8.1f} {(t[0] - t[1]) / LAYERS:7.2f} {t[2]:10.1f} {t[3]:8.1f} "
            f"{(t[2] - t[3]) / (2 * LAYERS):7.2f}"
        )
    print(
        f"{'M':>4s} {'cublas':>8s} {'+PDLnorm':>8s} {'triton':>8s} {'+PDL':>8s} {'us/gemm':>8s}  (us per step of 28 layers x 4 GEMMs,"
        f" each + a norm; us/gemm: cublas - triton+PDL)"
    )
    part = torch.empty(16 * 256 * 6144, dtype=torch.float32, device=dev)
    count = torch.zeros(1 << 16, dtype=torch.int32, device=dev)
    lw = [[torch.randn(o, i, dtype=dt, device=dev) * 0.02 for i, o in SHAPES] for _ in range(LAYERS)]
    for m in (int(s) for s in a.sizes.split(",")):
        xs = [torch.randn(m, i, dtype=dt, device=dev) for i, _ in SHAPES]
        hs = [torch.empty(m, o, dtype=dt, device=dev) for _, o in SHAPES]

        def layer(triton_gemm: bool, pdl: bool):
            def fn():
                for ws_ in lw:
                    for j, w in enumerate(ws_):
                        if triton_gemm:
                            gemm(xs[j], w, hs[j], part, count, pdl)
                        else:
                            torch.matmul(xs[j], w.t(), out=hs[j])
                        norm(hs[j], nw, xs[(j + 1) % 4], pdl)

            return fn

        ref = [x.clone() for x in xs]
        res = []
        for tg, pdl in ((False, False), (True, True)):
            for x, r in zip(xs, ref):
                x.copy_(r)
            layer(tg, pdl)()
            res.append([x.float().clone() for x in xs])
        err = max(((p - q).abs().max() / p.abs().max().clamp_min(1e-6)).item() for p, q in zip(*res))
        t = [graph_us(layer(tg, pdl)) for tg, pdl in ((False, False), (False, True), (True, False), (True, True))]
        print(
            f"{m:4d} {t[0]:8.1f} {t[1]:8.1f} {t[2]:8.1f} {t[3]:8.1f} {(t[0] - t[3]) / (4 * LAYERS):8.2f}  "
            f"(triton vs cublas rel. err {err:.1e})"
        )


if __name__ == "__main__":
    main()
