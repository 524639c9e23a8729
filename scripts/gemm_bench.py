"""The decode step's GEMMs (Qwen3-0.6B shapes) by batch size, as the model runs them: 28 layers of
distinct weights (so nothing stays in L2) captured in one CUDA graph, timed per step. Rows:
cuBLAS as PyTorch picks it, cuBLAS after PyTorch's TunableOp tried every cuBLASLt algorithm for
the shape (cold-L2 rotating buffer), and a split-K Triton kernel autotuned per shape. #5: the GEMMs take
~0.85 ms of a decode step against ~0.3 ms for their weights at the copy bandwidth.

    python scripts/gemm_bench.py [--sizes 16,64,128,256] [--no-tunable] [--no-triton]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (name, in, out) per layer, as Qwen3-0.6B's linear layers (q,k,v fused; gate,up fused)
SHAPES = (("qkv", 1024, 4096), ("o", 2048, 1024), ("gate_up", 1024, 6144), ("down", 3072, 1024))
LAYERS = 28


def _configs():
    return [
        triton.Config({"BM": bm, "BN": bn, "BK": bk, "SPLIT": sp}, num_warps=4, num_stages=4)
        for bm in (16, 32, 64, 128)
        for bn in (32, 64, 128)
        for bk in (128, 256)
        for sp in (1, 2, 4, 8)
        if 4 * (bm + bn) * bk * 2 <= 200 * 1024
    ]


def _prune(configs, named_args, **kw):
    M, K = named_args["M"], named_args["K"]
    return [
        c
        for c in configs
        if c.kwargs["BM"] <= max(16, M)
        and K % (c.kwargs["SPLIT"] * c.kwargs["BK"]) == 0
        and (c.kwargs["BM"] >= min(M, 64))
    ]


@triton.autotune(configs=_configs(), key=["M", "N", "K"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _linear(x, w, out, part, count, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr):
    """out[M, N] = x[M, K] @ w[N, K]^T; a BM x BN tile per program, K split over SPLIT programs whose
    fp32 partials the last to finish sums in split order (deterministic)."""
    pn, ps, pm = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_len = K // SPLIT
    for k in range(ps * k_len, (ps + 1) * k_len, BK):
        a = tl.load(x + rm[:, None] * K + (k + rk)[None, :], mask=rm[:, None] < M, other=0.0)
        b = tl.load(w + rn[None, :] * K + (k + rk)[:, None])
        acc += tl.dot(a, b)
    _store_split(acc, out, part, count, rm, rn, M, N, ps, pm, SPLIT)


@triton.jit
def _store_split(acc, out, part, count, rm, rn, M, N, ps, pm, SPLIT: tl.constexpr):
    """Program (pn, ps, pm)'s fp32 tile acc of out[rm, rn]: stored directly without a K split; else
    as split ps's partial, and the last of the tile's SPLIT programs to finish sums the partials
    in split order (deterministic) and resets the tile's counter (for the next call or replay)."""
    mask = rm[:, None] < M
    if SPLIT == 1:
        tl.store(out + rm[:, None] * N + rn[None, :], acc.to(out.dtype.element_ty), mask=mask)
    else:
        tl.store(part + ps * M * N + rm[:, None] * N + rn[None, :], acc, mask=mask)
        tl.debug_barrier()
        tile = pm * tl.num_programs(0) + tl.program_id(0)
        done = tl.atomic_add(count + tile, 1)  # acq_rel: the other splits' partials are visible
        if done == SPLIT - 1:
            tot = tl.zeros(acc.shape, dtype=tl.float32)
            for s in range(SPLIT):
                tot += tl.load(part + s * M * N + rm[:, None] * N + rn[None, :], mask=mask, cache_modifier=".cg")
            tl.store(out + rm[:, None] * N + rn[None, :], tot.to(out.dtype.element_ty), mask=mask)
            tl.atomic_xchg(count + tile, 0)


_PART = {}


def triton_linear(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    M, K = x.shape
    N = w.shape[0]
    if x.device not in _PART:
        _PART[x.device] = (
            torch.empty(8 * 256 * 6144, dtype=torch.float32, device=x.device),
            torch.zeros(1 << 16, dtype=torch.int32, device=x.device),
        )
    part, count = _PART[x.device]
    _linear[lambda m: (triton.cdiv(N, m["BN"]), m["SPLIT"], triton.cdiv(M, m["BM"]))](x, w, out, part, count, M, N, K)
    return out


def main() -> None:
    from bench import copy_bandwidth
    from nanovllmx.utils.profiling import graph_time

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="16,32,64,128,256")
    ap.add_argument("--no-tunable", action="store_true")
    ap.add_argument("--no-triton", action="store_true")
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

    def run_triton(m, names):
        def fn():
            for n in names:
                for w in weights[n]:
                    triton_linear(xs[m][n], w, outs[m][n])

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
        row["cublas lm_head"] = graph_time(lambda: torch.matmul(x_head[m], lm_head.t())) * 1e3
        if not a.no_triton:
            row["triton"] = graph_time(run_triton(m, names)) * 1e3
            for n in names:
                row[f"triton {n}"] = graph_time(run_triton(m, [n])) * 1e3
        rows.append(row)
    if not a.no_tunable:
        import torch.cuda.tunable as tunable

        tunable.enable(True)
        tunable.tuning_enable(True)
        tunable.set_rotating_buffer_size(256)  # MB: time each candidate with a cold L2, as in the model
        tunable.set_filename("/tmp/tunableop_results.csv")
        for row in rows:
            m = row["M"]
            row["tunable"] = graph_time(run_cublas(m, names)) * 1e3
            for n in names:
                row[f"tunable {n}"] = graph_time(run_cublas(m, [n])) * 1e3
            row["tunable lm_head"] = graph_time(lambda: torch.matmul(x_head[m], lm_head.t())) * 1e3
    keys = [k for k in rows[0] if k != "M"]
    print("ms per decode step (all 28 layers of the shape; 'bound' = the layers' weights at the copy bandwidth)")
    print(f"{'M':>4s} " + " ".join(f"{k:>15s}" for k in keys))
    for row in rows:
        print(f"{row['M']:>4d} " + " ".join(f"{row.get(k, float('nan')):15.3f}" for k in keys))
    if not a.no_triton:
        print(
            "Triton's best config by (M, N, K): " + "; ".join(f"{k[:3]}: {c.kwargs}" for k, c in _linear.cache.items())
        )


if __name__ == "__main__":
    main()
