"""A decode step's small kernels by batch size, this tree's next to a baseline tree's (--base), each
captured in a CUDA graph, with the bytes they must move at the copy bandwidth as the bound:
  sampling:     temperature 0.6, no filters, over Qwen3's 152k vocabulary (kernels/sampling.py),
                and PyTorch's Sampler._full path (eager) for scale;
  qk_norm_rope: q/k RMSNorm + RoPE + the K/V store (kernels/fused.py) at Qwen3-0.6B's heads, also
                at a 16k-token prefill chunk.

    python scripts/kernel_bench.py [--sizes 16,64,128,256] [--base OTHER_TREE]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _module(tree: str, rel: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(tree, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    from bench import copy_bandwidth
    from nanovllmx.kernels import fused, sampling
    from nanovllmx.scheduler.messages import SamplingArrays
    from nanovllmx.utils.profiling import cuda_time, graph_time
    from nanovllmx.worker.sampler import Sampler

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="16,64,128,256")
    ap.add_argument("--base", default=None, help="another checkout: time its kernels too")
    a = ap.parse_args()
    trees = {"this": (sampling, fused)}
    if a.base:
        trees["base"] = (
            _module(a.base, "nanovllmx/kernels/sampling.py", "base_sampling"),
            _module(a.base, "nanovllmx/kernels/fused.py", "base_fused"),
        )
    bw, V, dev = copy_bandwidth(), 151936, torch.device("cuda")
    sizes = [int(s) for s in a.sizes.split(",")]
    torch.manual_seed(0)
    print(
        f"sampling {'B':>5s} {'bound':>7s} " + " ".join(f"{k:>7s}" for k in trees) + f" {'torch':>7s}   (us per step)"
    )
    for B in sizes:
        logits = (torch.randn(B, V, device=dev) * 3).to(torch.bfloat16)
        inv_t = torch.full((B,), 1 / 0.6, device=dev)
        keys = torch.arange(B, dtype=torch.int32, device=dev)
        row = [graph_time(lambda m=m: m[0].gumbel_sample(logits, inv_t, keys), 50) * 1e6 for m in trees.values()]
        sa = SamplingArrays(
            temperature=np.full(B, 0.6, np.float32),
            top_p=np.ones(B, np.float32),
            top_k=np.zeros(B, np.int32),
            min_p=np.zeros(B, np.float32),
            seeds=np.full(B, -1, np.int64),
            output_lens=np.zeros(B, np.int32),
            needs_filter=False,
            all_greedy=False,
        )
        s = Sampler(dev, fused=False)
        t_torch = cuda_time(lambda: s._full(logits, sa), 10) * 1e6  # eager: it copies host arrays in
        print(
            f"sampling {B:5d} {logits.numel() * 2 / bw * 1e6:7.1f} "
            + " ".join(f"{t:7.1f}" for t in row)
            + f" {t_torch:7.1f}"
        )
    H, HKV, D, S = 16, 8, 128, 1 << 18
    kc, vc = (
        torch.zeros(S, HKV, D, dtype=torch.bfloat16, device=dev),
        torch.zeros(S, HKV, D, dtype=torch.bfloat16, device=dev),
    )
    cos_sin = torch.randn(40960, D, device=dev)
    qw, kw = torch.ones(D, dtype=torch.bfloat16, device=dev), torch.ones(D, dtype=torch.bfloat16, device=dev)
    print(f"qk_norm_rope {'T':>5s} {'bound':>7s} " + " ".join(f"{k:>7s}" for k in trees) + "   (us per layer)")
    for T in sizes + [16384]:
        qkv = torch.randn(T, (H + 2 * HKV) * D, dtype=torch.bfloat16, device=dev)
        pos = torch.randint(0, 40960, (T,), dtype=torch.int32, device=dev)
        slots = torch.randperm(S, device=dev)[:T].to(torch.int32)
        byts = qkv.numel() * 2 * 2 + T * D * 4  # qkv read, q/k/v written, a float32 cos|sin row read per token
        row = [
            graph_time(
                lambda m=m: m[1].qk_norm_rope_store(qkv, H, HKV, D, qw, kw, 1e-6, cos_sin, pos, kc, vc, slots), 50
            )
            * 1e6
            for m in trees.values()
        ]
        print(f"qk_norm_rope {T:5d} {byts / bw * 1e6:7.1f} " + " ".join(f"{t:7.1f}" for t in row))


if __name__ == "__main__":
    main()
