"""The engine's host side alone, on any machine: the standard workload through `LLM.generate` with
the worker replaced by a stand-in whose "GPU" step takes the time measured for that batch size on
an H100 (scripts/step_bench.py) and whose launch costs the measured host time of a graph step. The
scheduler, overlap, output processing and detokenization are the real ones. Prints how much of
the run the simulated GPU sat idle waiting for the host: what overlap fails to hide.

    python scripts/host_bench.py --model /tmp/tiny [--gpu-scale 1.0] [--launch-ms 0.5] [--profile]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# one decode step replayed from its graph on an H100 (docs/benchmarks.md, 3rd session), ms by batch
_DECODE_MS = {1: 1.46, 8: 1.67, 32: 2.54, 64: 3.53, 128: 5.85, 256: 10.26}
_PREFILL_US_PER_TOKEN = 1.5  # a chunk of 8192 prompt tokens: ~12 ms of GEMMs and attention


def gpu_ms(num_reqs: int, num_tokens: int) -> float:
    xs = np.array(list(_DECODE_MS))
    t = float(np.interp(num_reqs, xs, np.array(list(_DECODE_MS.values()))))
    return t + (num_tokens - num_reqs) * _PREFILL_US_PER_TOKEN / 1e3


class _Timeline:
    """A single in-order stream: a step starts when launched and when the previous one is done."""

    def __init__(self) -> None:
        self.free_at = 0.0
        self.busy = 0.0
        self.lock = threading.Lock()

    def submit(self, ms: float) -> float:
        with self.lock:
            start = max(time.perf_counter(), self.free_at)
            self.free_at = start + ms / 1e3
            self.busy += ms / 1e3
            return self.free_at


class _Handle:
    def __init__(self, done_at: float, n: int, vocab: int):
        self.done_at, self.n, self.vocab = done_at, n, vocab

    def result(self) -> np.ndarray:
        wait = self.done_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)  # as event.synchronize(): the GIL is free meanwhile
        return np.random.randint(0, self.vocab, self.n).astype(np.int32)


def make_executor(scale: float, launch_ms: float, timeline: _Timeline):
    class SimulatedExecutor:
        supports_overlap = True

        def __init__(self, cfg):
            self.vocab = min(cfg.hf_config.vocab_size, 150_000)

        def available_kv_slots(self) -> int:
            return 600_000

        def init_kv_cache(self, num_slots: int) -> None:
            pass

        def execute_async(self, batch):
            end = time.perf_counter() + launch_ms / 1e3
            while time.perf_counter() < end:  # the worker's host work holds the GIL, as plan + replay do
                pass
            done_at = timeline.submit(scale * gpu_ms(batch.num_reqs, batch.num_tokens))
            return _Handle(done_at, len(batch.sample_rows), self.vocab)

        def execute(self, batch):
            return self.execute_async(batch).result()

        def shutdown(self) -> None:
            pass

    return SimulatedExecutor


def main() -> None:
    import nanovllmx.engine.executor as executor_mod
    from bench import standard_workload
    from nanovllmx import LLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="any checkpoint folder (only its config and tokenizer are used)")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--gpu-scale", type=float, default=1.0, help="multiply the simulated GPU step times")
    ap.add_argument("--launch-ms", type=float, default=0.5, help="host time of one launch (graph step: 0.4-0.6 ms)")
    a = ap.parse_args()
    timeline = _Timeline()
    executor_mod.LocalExecutor = make_executor(a.gpu_scale, a.launch_ms, timeline)
    llm = LLM(a.model, device="cpu", max_bs=256, context_len=4096, overlap_scheduling=True)
    prompts, params = standard_workload(a.num_seqs)
    llm.generate(["warm-up"], params[0].__class__(max_tokens=4), use_tqdm=False)
    busy0, warm = timeline.busy, llm.stats()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t
    busy = timeline.busy - busy0
    tokens = sum(len(o.token_ids) for o in outs)
    stats = llm.stats()
    n = stats["num_steps"] - warm["num_steps"]
    step_ms = {
        k: round((v * stats["num_steps"] - warm["step_ms"].get(k, 0) * warm["num_steps"]) / n, 3)
        for k, v in stats["step_ms"].items()
    }
    print(
        f"{tokens} tokens in {wall:.2f} s ({tokens / wall:,.0f} tok/s); simulated GPU busy {busy:.2f} s "
        f"= {100 * busy / wall:.1f}% of the run, idle {wall - busy:.2f} s; {n} steps; host ms per step {step_ms}"
    )
    llm.shutdown()


if __name__ == "__main__":
    main()
