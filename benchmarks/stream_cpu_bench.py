"""CPU cost per streamed token on a Serve replica, without HTTP: the engine's outputs go through
OutputProcessor (detokenization, on the poll thread as on the replica), DeltaStream, EngineStream
and the SSE chunk builder (on the event loop), for --streams concurrent streams of --steps tokens.

    python -m benchmarks.stream_cpu_bench --model ~/.cache/nanovllmx/nanovllmx-demo
"""

from __future__ import annotations

import argparse
import asyncio
import random
import threading
import time

from transformers import AutoTokenizer

from nanovllmx.engine.detokenizer import IncrementalDetokenizer
from nanovllmx.engine.output_processor import OutputProcessor, RequestState
from nanovllmx.engine.stream import DeltaStream
from nanovllmx.sampling_params import SamplingParams
from nanovllmx.scheduler.request import EngineOutput
from nanovllmx.serve.protocol import CompletionRequest
from nanovllmx.serve.streaming import ChoiceChunks, ChunkHead, EngineStream, choice_events


class _Replica:  # what EngineStream needs of its replica; no metrics, nothing to abort
    llm = None
    metrics = None
    num_aborted = 0


async def run(model: str, n: int, steps: int, step_gap_s: float) -> None:
    tok = AutoTokenizer.from_pretrained(model)
    loop = asyncio.get_running_loop()
    proc = OutputProcessor(tok)
    body = CompletionRequest(model="m", prompt="hi", stream=True, max_tokens=steps)
    head = ChunkHead("cmpl-x", "text_completion", 0, "m")
    events = []
    for i in range(n):
        st = RequestState(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=steps), IncrementalDetokenizer(tok, None))
        st.queue, st.loop = asyncio.Queue(), loop
        proc.add(st)
        stream = EngineStream(_Replica(), DeltaStream(st, 1, lambda rid: None), 3)  # type: ignore[arg-type]
        events.append(choice_events(stream, ChoiceChunks(head, body, [1, 2, 3], 0)))
    rng = random.Random(0)
    ids = [rng.randrange(1000, 100000) for _ in range(n * steps)]
    proc_cpu = 0.0

    def engine() -> None:  # the poll thread: one step's outputs at a time
        nonlocal proc_cpu
        for s in range(steps):
            outs = [EngineOutput(f"r{i}", [ids[s * n + i]], "length" if s == steps - 1 else None) for i in range(n)]
            t0 = time.thread_time()
            proc.process(outs)
            proc_cpu += time.thread_time() - t0
            time.sleep(step_gap_s)

    chunks = 0

    async def consume(gen) -> None:  # type: ignore[no-untyped-def]
        nonlocal chunks
        async for _ in gen:
            chunks += 1

    th = threading.Thread(target=engine)
    c0 = time.process_time()
    th.start()
    await asyncio.gather(*(consume(g) for g in events))
    th.join()
    cpu, tokens = time.process_time() - c0, n * steps
    print(
        f"{tokens} tokens in {chunks} chunks: {cpu / tokens * 1e6:.1f} us CPU per token "
        f"(output processing {proc_cpu / tokens * 1e6:.1f}, streams and chunks {(cpu - proc_cpu) / tokens * 1e6:.1f})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a checkpoint folder (its tokenizer)")
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--step-gap-ms", type=float, default=2.0, help="time between engine steps")
    a = ap.parse_args()
    asyncio.run(run(a.model, a.streams, a.steps, a.step_gap_ms / 1000))


if __name__ == "__main__":
    main()
