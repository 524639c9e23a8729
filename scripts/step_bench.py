"""Where one decode step's GPU time goes, by batch size: the captured CUDA graph replayed alone
(no CPU, no scheduler; sampling included), the attention kernels alone, the rest, and what the roofline allows for
the same step (weights once + the step's KV once at the copy bandwidth). With --kernels, a
torch.profiler table by kernel category for the largest and a small batch.

    python scripts/step_bench.py --model /tmp/q06 [--sizes 8,32,64,128,256] [--kernels]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    from bench import copy_bandwidth
    from nanovllmx import LLM
    from nanovllmx.scheduler.messages import SamplingArrays, ScheduledBatch
    from nanovllmx.utils.profiling import cuda_time, format_summary, kernel_summary

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--sizes", default="1,8,32,64,128,256")
    ap.add_argument("--ctx-min", type=int, default=100)
    ap.add_argument("--ctx-max", type=int, default=1500)
    ap.add_argument("--kernels", action="store_true")
    a = ap.parse_args()
    llm = LLM(a.model, max_bs=256, context_len=4096)
    runner = llm.core.executor.worker.runner
    graphs, be, kv = runner.graphs, runner.backend, runner.kv
    n_layers = len(kv.k)
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    kv_tok = 2 * n_layers * kv.k[0].shape[1] * kv.k[0].shape[2] * kv.k[0].element_size()
    bw = copy_bandwidth()
    rng = np.random.default_rng(0)
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s, weights {weight_bytes / 1e9:.2f} GB, {n_layers} layers")
    print(
        f"{'bs':>4s} {'ctx':>6s} {'step ms':>8s} {'attn ms':>8s} {'rest ms':>8s} {'bound ms':>8s} {'step/bound':>10s} {'attn TB/s':>9s} {'sample ms':>9s} {'host ms':>7s}"
    )
    profiled = {}
    sizes = [int(s) for s in a.sizes.split(",")]
    for bs in sizes:
        lens = rng.integers(a.ctx_min, a.ctx_max + 1, bs).astype(np.int32)
        slots = rng.permutation(kv.num_slots)[: int(lens.sum())] + 1  # scattered, as in a long-running pool
        off = 0
        for i, n in enumerate(lens):
            runner.req_to_token[i, :n] = torch.from_numpy(slots[off : off + n].astype(np.int32)).cuda()
            off += n
        gbs = next(s for s in graphs.sizes if s >= bs)
        sa = SamplingArrays(
            temperature=np.full(bs, 0.6, np.float32),
            top_p=np.ones(bs, np.float32),
            top_k=np.zeros(bs, np.int32),
            min_p=np.zeros(bs, np.float32),
            seeds=np.full(bs, -1, np.int64),
            output_lens=np.zeros(bs, np.int32),
            needs_filter=False,
            all_greedy=False,
        )
        none = np.zeros(0, np.int32)
        b = ScheduledBatch(
            step=0,
            req_indices=np.arange(bs, dtype=np.int32),
            start_pos=lens - 1,
            q_lens=np.ones(bs, np.int32),
            input_ids=rng.integers(0, 1000, bs).astype(np.int32),
            out_slots=slots[np.cumsum(lens) - 1].astype(np.int32),
            table_rows=none,
            table_cols=none,
            table_slots=none,
            sample_rows=np.arange(bs, dtype=np.int32),
            sampling=sa,
        )
        graphs.run(b)  # plans the wrapper for these contexts
        c = graphs.captured[gbs]
        host_s = 0.0
        for _ in range(20):  # host cost of a step: pack, one copy, plan, replay (the GPU idle before each)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            graphs.run(b)
            host_s += (time.perf_counter() - t0) / 20
        step = cuda_time(c.graph.replay)  # the whole device step, sampling included
        q = torch.randn(gbs, be.num_heads, be.head_dim, dtype=kv.k[0].dtype, device="cuda")
        attn = cuda_time(lambda: [be.active.run(q, be.caches[layer]) for layer in range(n_layers)])
        logits = c.logits[:bs]
        sample = cuda_time(lambda: runner.sampler(logits, sa))
        kv_bytes = int(lens.sum()) * kv_tok
        bound = (weight_bytes + kv_bytes) / bw
        print(
            f"{bs:4d} {int(lens.mean()):6d} {step * 1e3:8.3f} {attn * 1e3:8.3f} {(step - attn) * 1e3:8.3f} "
            f"{bound * 1e3:8.3f} {step / bound:10.2f} {kv_bytes / attn / 1e12:9.2f} {sample * 1e3:9.3f} {host_s * 1e3:7.3f}"
        )
        if a.kernels and bs in (sizes[-1], 32):
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            with prof:
                for _ in range(10):
                    c.graph.replay()
                torch.cuda.synchronize()
            profiled[bs] = (kernel_summary(prof, 10), prof)
    for bs, (rows, prof) in profiled.items():
        print(f"\n== decode step at bs {bs}: device time by kernel category (graph replay)")
        print(format_summary(rows))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=70))
    llm.shutdown()


if __name__ == "__main__":
    main()
