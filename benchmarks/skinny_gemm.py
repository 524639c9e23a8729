"""Experiment (issue 25, item 2): can a Triton GEMM built for decode's skinny M beat cuBLAS's
per-GEMM floor (5-9 us whatever M is, benchmarks/gemm_bench.py)? Measured on an H200 (12th
session, docs/benchmarks.md): it ties cuBLAS at M = 32 (0.93-1.02x per shape) and loses at
M = 256 (1.4-2.5x), so the engine keeps cuBLAS; the floor is per kernel, not per algorithm.

What differs from the split-K kernel tried in the 4th session (which tied cuBLAS at M = 16 and
lost above):
- swap-AB: the weight rows are the MMA's M side (64 or 128 rows, Hopper's wgmma shape) and the
  batch is its N side (16..256), instead of padding a batch of 16 up to an M tile;
- deep software pipelines (up to 8 stages), so most of a program's weight slice is in flight at
  once (the floor looked like DRAM latency paid once per K step);
- the configuration chosen per shape and M on cold weights (28 distinct layers per graph replay,
  as the model runs them), where Triton's autotuner would time L2-hot repeats of one weight.

    python -m benchmarks.skinny_gemm [--sizes 32,128,256] [--quick]
    TRITON_INTERPRET=1 python -m benchmarks.skinny_gemm --check   # the kernel against torch (CPU)
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import triton
import triton.language as tl

from benchmarks.gemm_bench import LAYERS, SHAPES


@triton.jit
def _skinny_linear(
    x, w, out, part, count, M, N, K, BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr
):
    """out[M, N] = x[M, K] @ w[N, K]^T as (w @ x^T)^T: program (pn, ps) takes weight rows
    [pn*BN, +BN) over K range ps of SPLIT; the last split of a tile to finish sums the fp32
    partials in split order (deterministic) and resets the tile's counter."""
    pn, ps = tl.program_id(0), tl.program_id(1)
    rn = pn * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    k_len = K // SPLIT
    k0 = ps * k_len
    for k in range(k0, k0 + k_len, BK):
        a = tl.load(w + rn[:, None] * K + (k + rk)[None, :])
        b = tl.load(x + rm[None, :] * K + (k + rk)[:, None], mask=rm[None, :] < M, other=0.0)
        acc += tl.dot(a, b)
    mask = rm[None, :] < M
    offs = rm[None, :] * N + rn[:, None]
    if SPLIT == 1:
        tl.store(out + offs, acc.to(out.dtype.element_ty), mask=mask)
    else:
        tl.store(part + ps * M * N + offs, acc, mask=mask)
        tl.debug_barrier()
        done = tl.atomic_add(count + pn, 1)  # acq_rel: the other splits' partials are visible
        if done == SPLIT - 1:
            tot = tl.zeros((BN, BM), dtype=tl.float32)
            for s in range(SPLIT):
                tot += tl.load(part + s * M * N + offs, mask=mask, cache_modifier=".cg")
            tl.store(out + offs, tot.to(out.dtype.element_ty), mask=mask)
            tl.atomic_xchg(count + pn, 0)


_SCRATCH: dict = {}


def skinny_linear(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, cfg: dict) -> torch.Tensor:
    M, K = x.shape
    N = w.shape[0]
    if x.device not in _SCRATCH:
        _SCRATCH[x.device] = (
            torch.empty(8 * 256 * 6144, dtype=torch.float32, device=x.device),
            torch.zeros(1 << 12, dtype=torch.int32, device=x.device),
        )
    part, count = _SCRATCH[x.device]
    BM = max(16, triton.next_power_of_2(M))
    _skinny_linear[(N // cfg["BN"], cfg["SPLIT"])](
        x,
        w,
        out,
        part,
        count,
        M,
        N,
        K,
        BN=cfg["BN"],
        BM=BM,
        BK=cfg["BK"],
        SPLIT=cfg["SPLIT"],
        num_warps=cfg["warps"],
        num_stages=cfg["stages"],
    )
    return out


def configs(n: int, k: int, m: int, quick: bool) -> list[dict]:
    """Candidate configurations for one shape: programs between 64 and 528 (the H200 has 132
    SMs), shared memory of the pipeline under ~200 KB."""
    out = []
    bns = (64, 128) if quick else (32, 64, 128)
    bks = (128,) if quick else (64, 128)
    stages = (4, 8) if quick else (4, 8)
    bm = max(16, triton.next_power_of_2(m))
    for bn, bk, st, sp in itertools.product(bns, bks, stages, (1, 2, 4, 8)):
        progs = n // bn * sp
        if k % (bk * sp) or not 64 <= progs <= 528 or st * (bn + bm) * bk * 2 > 200 * 1024:
            continue
        if k // (bk * sp) < st - 1:  # a pipeline deeper than the loop
            continue
        out.append({"BN": bn, "BK": bk, "stages": st, "SPLIT": sp, "warps": 4 if bn * bm <= 64 * 128 else 8})
    return out


def check() -> None:
    """The kernel against torch on small shapes (runs under TRITON_INTERPRET=1 on the CPU)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32  # the interpreter has no bf16 arithmetic
    torch.manual_seed(0)
    for m, n, k, cfg in (
        (5, 128, 256, {"BN": 64, "BK": 64, "stages": 2, "SPLIT": 1, "warps": 4}),
        (16, 128, 256, {"BN": 32, "BK": 64, "stages": 2, "SPLIT": 2, "warps": 4}),
        (33, 256, 512, {"BN": 64, "BK": 64, "stages": 2, "SPLIT": 4, "warps": 4}),
    ):
        x = torch.randn(m, k, device=dev, dtype=dt)
        w = torch.randn(n, k, device=dev, dtype=dt) * 0.05
        out = torch.empty(m, n, device=dev, dtype=dt)
        for _ in range(2):  # twice: the split counters must be reset by the first call
            skinny_linear(x, w, out, cfg)
            ref = x.float() @ w.float().t()
            err = (out.float() - ref).abs().max().item()
            assert err < 2e-2 * ref.abs().max().item(), (m, n, k, cfg, err)
    print("check ok")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="32,128,256")
    ap.add_argument("--quick", action="store_true", help="fewer configurations")
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    if a.check:
        check()
        return
    from benchmarks.roofline import copy_bandwidth
    from nanovllmx.utils.profiling import graph_time

    bw = copy_bandwidth()
    dt = torch.bfloat16
    weights = {n: [torch.randn(o, i, dtype=dt, device="cuda") * 0.02 for _ in range(LAYERS)] for n, i, o in SHAPES}
    sizes = [int(s) for s in a.sizes.split(",")]
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s; us per GEMM (28 distinct layers per replay, cold weights)")
    print(f"{'M':>4s} {'shape':>8s} {'bytes':>6s} {'cublas':>7s} {'triton':>7s} {'ratio':>6s}  best config (of n)")
    t0 = time.time()
    totals: dict[int, list[float]] = {}
    for m in sizes:
        for name, k, n in SHAPES:
            x = torch.randn(m, k, dtype=dt, device="cuda")
            out = torch.empty(m, n, dtype=dt, device="cuda")
            ws = weights[name]
            ref = x.float() @ ws[0].float().t()

            def run_cublas(x=x, ws=ws, out=out):
                for w in ws:
                    torch.matmul(x, w.t(), out=out)

            tc = graph_time(run_cublas) / LAYERS * 1e6
            best, best_cfg, cands = float("inf"), None, configs(n, k, m, a.quick)
            for cfg in cands:
                try:
                    skinny_linear(x, ws[0], out, cfg)
                    err = (out.float() - ref).abs().max().item()
                    if err > 2e-2 * ref.abs().max().item():
                        print(f"   wrong result {cfg}: {err}")
                        continue

                    def run_triton(cfg=cfg, x=x, ws=ws, out=out):
                        for w in ws:
                            skinny_linear(x, w, out, cfg)

                    t = graph_time(run_triton) / LAYERS * 1e6
                except Exception as e:  # noqa: BLE001 - a config that does not compile or fit is skipped
                    print(f"   {cfg}: {type(e).__name__}: {str(e)[:100]}")
                    continue
                if t < best:
                    best, best_cfg = t, cfg
            byt = n * k * 2 / bw * 1e6
            tot = totals.setdefault(m, [0.0, 0.0, 0.0])
            tot[0] += byt
            tot[1] += tc
            tot[2] += min(tc, best)
            print(
                f"{m:4d} {name:>8s} {byt:6.2f} {tc:7.2f} {best:7.2f} {best / tc:6.2f}  {best_cfg} (of {len(cands)})",
                flush=True,
            )
    print(f"search took {time.time() - t0:.0f} s")
    print("per decode step (28 layers x 4 GEMMs), ms: bytes / cublas / best of the two per shape")
    for m, (b, c, t) in totals.items():
        print(f"M={m:4d}  {b * LAYERS / 1e3:.3f} / {c * LAYERS / 1e3:.3f} / {t * LAYERS / 1e3:.3f}")


if __name__ == "__main__":
    main()
