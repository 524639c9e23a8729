"""The decode step's sampling (temperature 0.6, no filters) by batch size, over Qwen3's 152k
vocabulary: this tree's kernels/sampling.py, optionally a baseline tree's, and PyTorch's
Sampler._full path, each captured in a CUDA graph; the logits read once at the copy bandwidth
bounds it from below.

    python scripts/sample_bench.py [--sizes 16,64,128,256] [--base OTHER_TREE]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    from bench import copy_bandwidth
    from nanovllmx.kernels import sampling
    from nanovllmx.scheduler.messages import SamplingArrays
    from nanovllmx.utils.profiling import cuda_time, graph_time
    from nanovllmx.worker.sampler import Sampler
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="16,64,128,256")
    ap.add_argument("--base", default=None, help="another checkout: time its nanovllmx/kernels/sampling.py too")
    a = ap.parse_args()
    impls = {"this": sampling.gumbel_sample}
    if a.base:
        spec = importlib.util.spec_from_file_location("base_sampling", os.path.join(a.base, "nanovllmx/kernels/sampling.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        impls["base"] = mod.gumbel_sample
    bw, V = copy_bandwidth(), 151936
    torch.manual_seed(0)
    print(f"{'B':>4s} {'bound':>7s} " + " ".join(f"{k:>7s}" for k in impls) + f" {'torch':>7s}   (us per step)")
    for B in (int(s) for s in a.sizes.split(",")):
        logits = (torch.randn(B, V, device="cuda") * 3).to(torch.bfloat16)
        inv_t = torch.full((B,), 1 / 0.6, device="cuda")
        keys = torch.arange(B, dtype=torch.int32, device="cuda")
        row = [graph_time(lambda f=f: f(logits, inv_t, keys), 50) * 1e6 for f in impls.values()]
        sa = SamplingArrays(temperature=np.full(B, 0.6, np.float32), top_p=np.ones(B, np.float32),
                            top_k=np.zeros(B, np.int32), min_p=np.zeros(B, np.float32), seeds=np.full(B, -1, np.int64),
                            output_lens=np.zeros(B, np.int32), needs_filter=False, all_greedy=False)
        s = Sampler(torch.device("cuda"), fused=False)
        t_torch = cuda_time(lambda: s._full(logits, sa), 10) * 1e6  # eager: it copies host arrays in
        print(f"{B:4d} {logits.numel() * 2 / bw * 1e6:7.1f} " + " ".join(f"{t:7.1f}" for t in row) + f" {t_torch:7.1f}")


if __name__ == "__main__":
    main()
