"""Where the standard workload's GPU time goes, step by step: CUDA events around every step of the
in-process engine (`ModelRunner.execute`), bucketed by kind (prefill or mixed; decode by batch size
in powers of two) and set against each bucket's bytes at the copy bandwidth (the weights once, the
KV of every row) and, for prefill, its FLOPs at the bf16 rate. The kernel table of `bench.py
--torch-profile` says which kernels take the time; this says at which batch sizes the run falls
short of the roofline, and by how much per step.

    python -m benchmarks.step_table --model /tmp/q06

GPU only (CUDA events); the timed run is bench.py's standard workload after one warm-up request."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np


@dataclass
class Bucket:
    steps: int = 0
    gpu_ms: float = 0.0
    bytes_ms: float = 0.0  # the bucket's weights + KV reads at the copy bandwidth
    flop_ms: float = 0.0  # its linear layers' FLOPs at the bf16 matmul rate
    tokens: int = 0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--num-seqs", type=int, default=256)
    a = ap.parse_args(argv)

    import torch

    from bench import standard_workload
    from benchmarks import roofline
    from nanovllmx import LLM, SamplingParams
    from nanovllmx.worker.model_runner import ModelRunner

    bw = roofline.copy_bandwidth()
    shape = roofline.Shape.from_config(a.model)
    w_bytes, kv_tok = shape.step_weight_bytes(), shape.kv_token_bytes()  # as the bound counts them
    steps: list[tuple[torch.cuda.Event, torch.cuda.Event, bool, int, int, int]] = []
    execute = ModelRunner.execute

    def timed(self, b, hidden=None, residual=None):  # events on the stream the step's kernels go to
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        out = execute(self, b, hidden, residual)
        e.record()
        steps.append((s, e, bool(b.is_decode), b.num_reqs, b.num_tokens, int((b.start_pos + b.q_lens).sum())))
        return out

    ModelRunner.execute = timed  # type: ignore[method-assign]
    llm = LLM(a.model)
    prompts, params = standard_workload(a.num_seqs)
    llm.generate(["Benchmark: "], SamplingParams(max_tokens=8), use_tqdm=False)
    torch.cuda.synchronize()
    steps.clear()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    llm.shutdown()

    buckets: dict[tuple[int, int], Bucket] = {}  # (0 prefill / 1 decode, batch bucket)
    gaps = 0.0
    for i, (s, e, decode, reqs, tokens, ctx) in enumerate(steps):
        if i:
            gaps += max(0.0, steps[i - 1][1].elapsed_time(s))
        bk = buckets.setdefault((1, min(256, 1 << int(np.log2(max(reqs, 1))))) if decode else (0, 0), Bucket())
        bk.steps += 1
        bk.gpu_ms += s.elapsed_time(e)
        bk.bytes_ms += (w_bytes + ctx * kv_tok) / bw * 1e3
        bk.flop_ms += 2 * shape.active_body_params * tokens / roofline.H200_BF16_FLOPS * 1e3
        bk.tokens += tokens
    gpu = sum(b.gpu_ms for b in buckets.values())
    n_out = sum(len(o.token_ids) for o in outs)
    print(
        f"wall {dt:.3f} s ({n_out / dt:,.0f} tok/s), {len(steps)} steps: {gpu / 1e3:.3f} s on the GPU in steps, "
        f"{gaps / 1e3:.3f} s between them; copy bandwidth {bw / 1e12:.2f} TB/s"
    )
    print("| step | batch | steps | GPU ms | bytes ms | bytes / GPU | ms a step | tokens | FLOPs ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (kind, bs), b in sorted(buckets.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        rows = "-" if not kind else f"{bs}-{2 * bs - 1}" if bs < 256 else "256"
        print(
            f"| {'decode' if kind else 'prefill/mixed'} | {rows} | {b.steps} | {b.gpu_ms:.1f} | {b.bytes_ms:.1f} "
            f"| {b.bytes_ms / b.gpu_ms:.2f} | {b.gpu_ms / b.steps:.3f} | {b.tokens} | {b.flop_ms:.1f} |"
        )


if __name__ == "__main__":
    main()
