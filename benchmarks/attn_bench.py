"""How close FlashInfer's decode kernel gets to the copy bandwidth on the standard workload's shape
(Qwen3-0.6B: 16 query / 8 KV heads, head_dim 128, bf16; `--heads 32`: the 8B's), with our page
size 1 over a scattered token-slot pool, next to page size 16 over contiguous pages (what a paged engine gets).
KV reads dominate the roofline, so this bounds what the whole engine can reach.

The open question it answers (docs/benchmarks.md, "Next"): decode attention below 64 requests
reads at 1.4-3.3 TB/s against ~3.8 at 128+ on an H200. `--sweep` times the engine's own setting (a
CUDA-graph wrapper per batch size) for the kernels the engine picks from: CUDA cores ('cuda'),
tensor cores ('tc') and tensor cores without split-KV ('tc-nosplit', the engine's choice from 80
requests); another FlashInfer backend can be named too (e.g. 'fa2'). (fa3 and cuDNN were measured and
not adopted: docs/benchmarks-history.md.) A variant name with '@lpt' runs the same requests longest
first: without split-KV a request's work is one block per KV head, dispatched in request order,
so the last blocks to start may be long ones that finish alone (13th session: +0.7-1.5% for the
tensor-core kernel at 128-256 requests, so the scheduler now orders a step's rows longest first).

    python -m benchmarks.attn_bench [--bs 256] [--ctx-max 1500]
    python -m benchmarks.attn_bench --sweep 8,16,32,48,64,80,128 --ctx-min 600 --ctx-max 2000
    python -m benchmarks.attn_bench --sweep 32,64,128,256 --variants cuda,cuda@lpt,tc-nosplit,tc-nosplit@lpt
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from nanovllmx.utils.profiling import cuda_time


def sweep(sizes: list[int], ctx_min: int, ctx_max: int, variants: list[str], heads: int = 16) -> None:
    """The engine's own setting (a CUDA-graph decode wrapper per batch size, page 1 over scattered
    slots) for each decode kernel variant: 'cuda' (CUDA cores), 'tc' (tensor cores, backend auto),
    'tc-nosplit' (tensor cores planned with disable_split_kv), or a FlashInfer backend name (tensor
    cores, that backend). Prints TB/s per batch size."""
    import flashinfer

    H, HKV, D, dt, dev = heads, 8, 128, torch.bfloat16, torch.device("cuda")
    rng = np.random.default_rng(0)
    ws = torch.zeros(256 << 20, dtype=torch.uint8, device=dev)
    slots = 256 * ctx_max + 1024
    k = torch.randn(slots, 1, HKV, D, device=dev, dtype=dt)
    v = torch.randn_like(k)
    print(f"{'bs':>4s} {'ctx':>5s} " + " ".join(f"{n:>8s}" for n in variants) + "   (TB/s, graph-mode wrappers)")
    for bs in sizes:
        lens = rng.integers(ctx_min, ctx_max + 1, bs).astype(np.int32)
        total = int(lens.sum())
        idx = torch.from_numpy(rng.permutation(slots)[:total].astype(np.int32)).to(dev)
        indptr = torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
        lpt_indptr = torch.from_numpy(np.concatenate([[0], np.cumsum(np.sort(lens)[::-1])]).astype(np.int32))
        q = torch.randn(bs, H, D, device=dev, dtype=dt)
        cells = []
        for variant in variants:
            name, _, order = variant.partition("@")
            ip = indptr if order != "lpt" else lpt_indptr  # the same requests longest first
            kw = {} if name in ("cuda", "tc", "tc-nosplit") else {"backend": name}
            plan_kw = {"disable_split_kv": True} if name.endswith("-nosplit") else {}
            try:
                w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    ws,
                    "NHD",
                    use_cuda_graph=True,
                    use_tensor_cores=name != "cuda",
                    paged_kv_indptr_buffer=torch.zeros(bs + 1, dtype=torch.int32, device=dev),
                    paged_kv_indices_buffer=torch.zeros(256 * ctx_max, dtype=torch.int32, device=dev),
                    paged_kv_last_page_len_buffer=torch.ones(bs, dtype=torch.int32, device=dev),
                    **kw,
                )
                w.plan(
                    ip,
                    idx,
                    torch.ones(bs, dtype=torch.int32),
                    H,
                    HKV,
                    D,
                    1,
                    q_data_type=dt,
                    kv_data_type=dt,
                    **plan_kw,
                )
                s = cuda_time(lambda w=w, q=q: w.run(q, (k, v)))
                cells.append(f"{total * HKV * D * 2 * 2 / s / 1e12:8.2f}")
            except Exception as e:  # a backend this build or GPU lacks
                cells.append(f"{'n/a':>8s}")
                print(f"  {variant} at bs {bs}: {type(e).__name__}: {str(e)[:120]}")
        print(f"{bs:4d} {int(lens.mean()):5d} " + " ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bs", type=int, default=256)
    ap.add_argument("--ctx-min", type=int, default=100)
    ap.add_argument("--ctx-max", type=int, default=1500)
    ap.add_argument("--sweep", default=None, help="batch sizes, e.g. 8,32,64,128,256: kernel variants by batch size")
    ap.add_argument("--variants", default="cuda,tc,tc-nosplit")
    ap.add_argument(
        "--heads", type=int, default=16, help="query heads over 8 KV heads: 16 (0.6B, groups of 2), 32 (8B, 4)"
    )
    a = ap.parse_args()
    import flashinfer

    if a.sweep:
        return sweep([int(x) for x in a.sweep.split(",")], a.ctx_min, a.ctx_max, a.variants.split(","), a.heads)
    H, HKV, D, dt, dev = a.heads, 8, 128, torch.bfloat16, torch.device("cuda")
    rng = np.random.default_rng(0)
    lens = rng.integers(a.ctx_min, a.ctx_max + 1, a.bs).astype(np.int32)
    total = int(lens.sum())
    kv_bytes = total * HKV * D * 2 * 2
    q = torch.randn(a.bs, H, D, device=dev, dtype=dt)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    x = torch.empty(kv_bytes // 2, dtype=dt, device=dev)
    copy_s = cuda_time(lambda: x.clone())
    rows = [("copy (bytes read + written)", copy_s, 2 * kv_bytes)]
    slots = total + 1024
    k = torch.randn(slots, 1, HKV, D, device=dev, dtype=dt)
    v = torch.randn_like(k)
    for layout in ("scattered", "contiguous"):
        idx = (rng.permutation(slots)[:total] if layout == "scattered" else np.arange(total)).astype(np.int32)
        indptr = torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
        for tc in (False, True):
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc)
            w.plan(
                indptr,
                torch.from_numpy(idx).to(dev),
                torch.ones(a.bs, dtype=torch.int32),
                H,
                HKV,
                D,
                1,
                q_data_type=dt,
                kv_data_type=dt,
            )
            rows.append(
                (
                    f"page 1, {layout} slots, {'tensor' if tc else 'CUDA'} cores",
                    cuda_time(lambda w=w: w.run(q, (k, v))),
                    kv_bytes,
                )
            )
    # page 16, contiguous pages
    P = 16
    pages = (lens + P - 1) // P
    kp = torch.randn(int(pages.sum()) + 8, P, HKV, D, device=dev, dtype=dt)
    vp = torch.randn_like(kp)
    last = (lens - (pages - 1) * P).astype(np.int32)
    for tc in (False, True):
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc)
        w.plan(
            torch.from_numpy(np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)),
            torch.arange(int(pages.sum()), dtype=torch.int32, device=dev),
            torch.from_numpy(last),
            H,
            HKV,
            D,
            P,
            q_data_type=dt,
            kv_data_type=dt,
        )
        rows.append(
            (
                f"page 16, contiguous, {'tensor' if tc else 'CUDA'} cores",
                cuda_time(lambda w=w: w.run(q, (kp, vp))),
                kv_bytes,
            )
        )
    print(
        f"bs {a.bs}, contexts {a.ctx_min}..{a.ctx_max} ({total} tokens, {kv_bytes / 1e9:.2f} GB of KV per layer-step)"
    )
    print(f"{'kernel':44s} {'us':>8s} {'TB/s':>6s}")
    for name, s, nbytes in rows:
        print(f"{name:44s} {s * 1e6:8.1f} {nbytes / s / 1e12:6.2f}")


if __name__ == "__main__":
    main()
