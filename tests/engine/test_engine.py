"""The engine against `transformers`' own Qwen3ForCausalLM on the same tiny float32 checkpoint:
logits of our model (run through the worker's real batch preparation and the torch attention
backend) within tolerance, and greedy continuations identical token for token through the offline
`LLM` API: single requests, mixed-length batches, radix-cache hits, chunked prefill, preemption,
prefix caching off. Plus the offline API's shape: outputs, streaming, stop strings, errors, abort."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from nanovllmx import LLM, SamplingParams
from nanovllmx.attention.base import forward_context
from nanovllmx.config import EngineConfig
from nanovllmx.scheduler.request import EngineRequest
from nanovllmx.scheduler.scheduler import Scheduler
from tests.helpers import CONTEXT_LEN, EOS_IDS, random_prompt

GREEDY = dict(temperature=0.0, ignore_eos=True)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, **{**GREEDY, **kw})


def wait_idle(llm: LLM, timeout: float = 60.0) -> dict:
    """Stats once the engine has nothing running or waiting (aborts are applied asynchronously)."""
    deadline = time.time() + timeout
    while True:
        st = llm.stats()
        if st["num_running"] == 0 and st["num_waiting"] == 0:
            return st
        if time.time() > deadline:
            raise AssertionError(f"engine not idle: {st}")
        time.sleep(0.02)


def assert_no_leak(llm: LLM) -> None:
    st = wait_idle(llm)
    assert st["free_slots"] + st["cached_slots"] == st["num_slots"], st


# ====================================================================== logits parity (worker level)
@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    from nanovllmx.worker.worker import Worker

    cfg = EngineConfig(model=str(tiny_model_dir), context_len=CONTEXT_LEN, num_kv_slots=2048, max_bs=8)
    w = Worker(cfg)
    w.init_kv_cache(2048)
    yield w
    w.shutdown()


def test_warmup_touches_only_the_dummy_slot(tiny_model_dir):
    """ModelRunner.warmup (run by init_kv_cache) compiled the prefill path on scratch rows: the K/V
    it wrote all went to the reserved slot 0, the dummy req_to_token row still maps to it, and the
    step statistics start at zero."""
    from nanovllmx.worker.worker import Worker

    w = Worker(EngineConfig(model=str(tiny_model_dir), context_len=CONTEXT_LEN, num_kv_slots=256, max_bs=4))
    try:
        w.init_kv_cache(256)
        r = w.runner
        assert r.timer.steps == 0
        assert int(r.req_to_token[r.cfg.max_bs].abs().sum()) == 0
        for k, v in zip(w.kv.k, w.kv.v):
            assert k[0].abs().sum() > 0 and v[0].abs().sum() > 0  # the warm-up ran, into slot 0
            assert int(k[1:].count_nonzero()) == 0 and int(v[1:].count_nonzero()) == 0
    finally:
        w.shutdown()


@torch.inference_mode()
def forward_all_logits(worker, batch) -> torch.Tensor:
    """Logits of every token of a ScheduledBatch, through the runner's own batch preparation
    (req_to_token writes, positions, attention metadata) and the attention backend."""
    runner = worker.runner
    ids, positions, meta = runner.prepare(batch)
    runner.backend.prepare(meta)
    with forward_context(runner.backend):
        hidden = worker.model(ids, positions)
    return worker.model.compute_logits(hidden).float()


def run_forced(worker, hf_ref, waves: list[dict[str, list[int]]], budget: int, gen: int) -> dict:
    """Drive a real Scheduler + our model, feeding HF's greedy tokens as the sampled ones, and compare
    the logits of every computed position with HF's logits of the same sequence. `waves` of requests
    run one after the other (later waves can hit the radix cache). Returns per-request max abs diff
    and what the run exercised."""
    sched = Scheduler(2048, 8, CONTEXT_LEN, budget, list(EOS_IDS))
    ref_tokens, ref_logits, diffs, cached = {}, {}, {}, {}
    seen = {"chunks": 0, "decode_steps": 0, "mixed_steps": 0, "argmax_mismatch": 0}
    for wave in waves:
        for rid, p in wave.items():
            ref_tokens[rid] = hf_ref.greedy(p, gen)
            ref_logits[rid] = hf_ref.logits(p + ref_tokens[rid][:-1])
            diffs[rid] = 0.0
            sched.add_request(EngineRequest(rid, p, greedy(gen)))
        while sched.has_work():
            b = sched.schedule()
            row_of = {r.req_idx: r for r in sched.running}
            logits = forward_all_logits(worker, b)
            t = 0
            for ri, start, q in zip(b.req_indices.tolist(), b.start_pos.tolist(), b.q_lens.tolist()):
                r = row_of[ri]
                ours, ref = logits[t : t + q], ref_logits[r.request_id][start : start + q]
                diffs[r.request_id] = max(diffs[r.request_id], float((ours - ref).abs().max()))
                seen["chunks"] += start > 0 and q > 1
                t += q
            seen["decode_steps"] += b.is_decode
            seen["mixed_steps"] += (not b.is_decode) and bool((b.q_lens == 1).any())
            sampled = []
            last = np.cumsum(b.q_lens) - 1
            for i in b.sample_rows.tolist():
                r = row_of[int(b.req_indices[i])]
                forced = ref_tokens[r.request_id][r.num_output]
                seen["argmax_mismatch"] += int(logits[last[i]].argmax()) != forced
                sampled.append(forced)
            for o in sched.update(np.array(sampled, dtype=np.int32)):
                cached[o.request_id] = o.num_cached_tokens
    assert sched.allocator.num_free + sched.tree.total_size() == 2048 and sched.tree.protected_size == 0
    scale = max(float(v.abs().max()) for v in ref_logits.values())
    return {"diffs": diffs, "scale": scale, "cached": cached, **seen}


def test_prefill_logits_match_hf(worker, hf_ref):
    p = random_prompt(57, seed=1)
    batch_sched = Scheduler(2048, 8, CONTEXT_LEN, 8192, list(EOS_IDS))
    batch_sched.add_request(EngineRequest("a", p, greedy(1)))
    ours = forward_all_logits(worker, batch_sched.schedule())
    ref = hf_ref.logits(p)
    assert ours.shape == ref.shape == (57, 151936)
    scale = float(ref.abs().max())
    assert scale > 1.0  # the tiny model has real, non-flat logits
    diff = float((ours - ref).abs().max())
    print(f"prefill logit diff vs HF: {diff:.2e} (scale {scale:.1f})")
    assert diff < 1e-5 * scale, f"max |logit diff| {diff:.2e} (logit scale {scale:.1f})"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_logits_match_hf_batched_chunked_cached_and_decode(worker, hf_ref):
    shared = random_prompt(120, seed=2)
    wave1 = {
        "a": random_prompt(5, seed=3),
        "b": shared + random_prompt(30, seed=4),
        "c": random_prompt(200, seed=5),
        "d": random_prompt(1, seed=6),
    }
    wave2 = {"e": shared + random_prompt(9, seed=7), "f": wave1["a"] + random_prompt(3, seed=8)}
    res = run_forced(worker, hf_ref, [wave1, wave2], budget=64, gen=6)
    # the run exercised what it claims to
    assert res["chunks"] > 0 and res["decode_steps"] > 0 and res["mixed_steps"] > 0
    assert res["cached"]["e"] >= 120 and res["cached"]["f"] >= 5
    worst = max(res["diffs"].values())
    print(f"logit diffs vs HF: {res['diffs']} (scale {res['scale']:.1f})")
    assert worst < 1e-5 * res["scale"], f"max |logit diff| per request {res['diffs']} (scale {res['scale']:.1f})"
    assert res["argmax_mismatch"] == 0


# ====================================================================== greedy parity through LLM
@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    # overlap scheduling on (the GPU default): the API tests run the engine's more intricate path
    engine = LLM(str(tiny_model_dir), context_len=CONTEXT_LEN, overlap_scheduling=True)
    yield engine
    engine.shutdown()


def check_same(outs, prompts, hf_ref, ns):
    """Each output's tokens are exactly HF's greedy continuation (ns: max_tokens, one or per prompt)."""
    assert len(outs) == len(prompts)
    for i, (o, p) in enumerate(zip(outs, prompts)):
        n = ns[i] if isinstance(ns, list) else ns
        want = hf_ref.greedy(p, n)
        assert o.token_ids == want, (
            f"prompt {i} ({len(p)} tokens): first diff at "
            f"{next(k for k, (x, y) in enumerate(zip(o.token_ids + [-1] * n, want)) if x != y)}"
        )


def test_single_requests_match_hf(llm, hf_ref, tokenizer):
    text_prompt = "The capital of France is"
    ids = tokenizer.encode(text_prompt)
    out = llm.generate(text_prompt, greedy(16))
    assert len(out) == 1 and out[0].prompt_token_ids == ids
    assert out[0].token_ids == hf_ref.greedy(ids, 16)
    for n in (1, 2, 37, 255):
        p = random_prompt(n, seed=100 + n)
        (o,) = llm.generate([p], greedy(12))
        assert o.token_ids == hf_ref.greedy(p, 12), n
    assert_no_leak(llm)


def test_mixed_length_batch_matches_hf(llm, hf_ref):
    prompts = [random_prompt(n, seed=200 + n) for n in (5, 300, 17, 64, 1, 129, 33, 250)]
    t = time.perf_counter()
    outs = llm.generate(prompts, greedy(12))
    wall = time.perf_counter() - t
    check_same(outs, prompts, hf_ref, 12)
    assert all(o.finish_reason == "length" and len(o.token_ids) == 12 for o in outs)
    # TTFT (bench.py's offline TTFT): within the call, and before the 11 decode steps that follow
    assert all(o.ttft is not None and 0 < o.ttft < wall for o in outs)
    assert max(o.ttft for o in outs) < wall * 0.75, (max(o.ttft for o in outs), wall)
    assert_no_leak(llm)


def test_radix_cache_hits_match_hf(llm, hf_ref):
    shared = random_prompt(200, seed=300)
    p1, p2, p3 = shared + random_prompt(10, seed=301), shared + random_prompt(25, seed=302), shared + [7, 8]
    before = llm.stats()["cached_prompt_tokens_total"]
    (o1,) = llm.generate([p1], greedy(10))
    (o2,) = llm.generate([p2], greedy(10))
    (o3,) = llm.generate([p1], greedy(10))  # exact repeat
    # follow-up turn: prompt + its answer + more: the answer's KV is cached too
    p4 = p1 + o1.token_ids[:8] + random_prompt(5, seed=303)
    o4, o5 = llm.generate([p4, p3], greedy(10))
    assert o1.num_cached_tokens == 0
    assert o2.num_cached_tokens == 200
    assert o3.num_cached_tokens == len(p1) - 1
    assert o4.num_cached_tokens == len(p1) + 8
    assert o5.num_cached_tokens == 200
    assert llm.stats()["cached_prompt_tokens_total"] - before == 200 + len(p1) - 1 + len(p1) + 8 + 200
    check_same([o1, o2, o3, o4, o5], [p1, p2, p1, p4, p3], hf_ref, 10)
    assert_no_leak(llm)


def test_seeded_sampling_reproducible_across_batches(llm):
    p = random_prompt(20, seed=400)
    sp = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=12, seed=1234, ignore_eos=True)
    (alone,) = llm.generate([p], sp)
    batch = llm.generate(
        [random_prompt(9, seed=401), p, random_prompt(40, seed=402)],
        [greedy(20), sp, SamplingParams(temperature=0.7, top_k=5, max_tokens=3)],
    )
    assert batch[1].token_ids == alone.token_ids
    (other,) = llm.generate([p], SamplingParams(temperature=1.0, top_p=0.95, max_tokens=12, seed=99, ignore_eos=True))
    assert other.token_ids != alone.token_ids


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("budget", [64, 7])
def test_chunked_prefill_matches_hf(tiny_model_dir, hf_ref, budget, overlap):
    engine = LLM(
        str(tiny_model_dir), context_len=CONTEXT_LEN, max_num_batched_tokens=budget, overlap_scheduling=overlap
    )
    steps = []
    execute = engine.core.executor.execute_async

    def recording(batch):
        steps.append((batch.num_tokens, batch.q_lens.copy(), batch.has_placeholders))
        return execute(batch)

    engine.core.executor.execute_async = recording
    try:
        # short requests first: they decode while the 300-token prompt is prefilled chunk by chunk
        prompts = [random_prompt(n, seed=500 + n) for n in (4, 6, 9)] + [random_prompt(300, seed=599)]
        outs = engine.generate(prompts, [greedy(40)] * 3 + [greedy(8)])
        check_same(outs, prompts, hf_ref, [40, 40, 40, 8])
        assert all(n <= budget for n, _, _ in steps)
        # some steps decoded the short requests next to a prefill chunk of the long one
        assert any((q == 1).any() and (q > 1).any() for _, q, _ in steps)
        # with overlap, steps were scheduled before the previous step's tokens were known
        assert any(ph for _, _, ph in steps) == overlap
        assert len(steps) >= 300 // budget
        assert_no_leak(engine)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("overlap", [False, True])
def test_preempted_requests_match_hf(tiny_model_dir, hf_ref, overlap):
    # 256 slots (one full context) for 4 requests of 50 + 60 tokens: decode runs out, requests are
    # preempted and later recomputed (partly from the radix cache); with overlap some are preempted
    # while a token sampled for them is still in flight
    engine = LLM(
        str(tiny_model_dir), context_len=256, num_kv_slots=256, max_num_batched_tokens=128, overlap_scheduling=overlap
    )
    try:
        prompts = [random_prompt(50, seed=600 + i) for i in range(4)]
        outs = engine.generate(prompts, greedy(60))
        st = wait_idle(engine)
        assert st["num_preempted_total"] > 0
        check_same(outs, prompts, hf_ref, 60)
        assert st["free_slots"] + st["cached_slots"] == st["num_slots"] == 256
    finally:
        engine.shutdown()


def test_prefix_caching_disabled_same_tokens(tiny_model_dir, hf_ref):
    engine = LLM(str(tiny_model_dir), context_len=CONTEXT_LEN, enable_prefix_caching=False, max_num_batched_tokens=100)
    try:
        shared = random_prompt(150, seed=700)
        prompts = [shared + random_prompt(5, seed=701), shared + random_prompt(12, seed=702)]
        first = engine.generate(prompts, greedy(10))
        second = engine.generate(prompts, greedy(10))
        check_same(first, prompts, hf_ref, 10)
        assert [o.token_ids for o in second] == [o.token_ids for o in first]
        assert all(o.num_cached_tokens == 0 for o in first + second)
        st = wait_idle(engine)
        assert st["cached_slots"] == 0 and st["free_slots"] == st["num_slots"]
    finally:
        engine.shutdown()


# ====================================================================== offline API
def test_output_shape(llm, tokenizer):
    outs = llm.generate(["Hello", [151644, 872, 198]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(outs) == 2
    for o in outs:
        assert isinstance(o.token_ids, list) and len(o.token_ids) == 5 and all(isinstance(t, int) for t in o.token_ids)
        assert isinstance(o.text, str) and o.text == tokenizer.decode(o.token_ids, skip_special_tokens=True)
        assert o.finish_reason == "length"
        # the last prompt token is always computed (its logits give the first output token)
        assert isinstance(o.num_cached_tokens, int) and 0 <= o.num_cached_tokens < len(o.prompt_token_ids)
    assert outs[1].prompt_token_ids == [151644, 872, 198]
    single = llm.generate([151644, 872, 198], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(single) == 1 and single[0].token_ids == outs[1].token_ids
    assert single[0].num_cached_tokens == 2  # the same prompt again: all of it but its last token from the cache
    assert llm.generate([], greedy(3)) == []
    assert outs[0].request_id != outs[1].request_id


def test_stop_token_ids_and_eos(llm, hf_ref):
    p = random_prompt(30, seed=800)
    ref = hf_ref.greedy(p, 20)
    k = next(i for i in range(3, 20) if ref[i] not in ref[:i])
    (o,) = llm.generate([p], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[ref[k]]))
    assert o.finish_reason == "stop" and o.token_ids == ref[: k + 1]
    (o,) = llm.generate([p], greedy(20))
    assert o.finish_reason == "length" and o.token_ids == ref
    # EOS comes from the checkpoint's generation_config (<|im_end|>, <|endoftext|>); the scheduler
    # tests check that it stops a request unless ignore_eos
    assert sorted(llm.config.eos_token_ids) == sorted(EOS_IDS)


def test_stop_strings_through_llm(llm, hf_ref, tokenizer):
    p = random_prompt(25, seed=900)
    full = tokenizer.decode(hf_ref.greedy(p, 24), skip_special_tokens=True)
    # a stop string from the middle of the greedy text, at its first occurrence
    stop = next(
        full[i : i + 3]
        for i in range(len(full) // 3, len(full) - 3)
        if full[i : i + 3].isprintable() and "\ufffd" not in full[i : i + 3] and full.find(full[i : i + 3]) == i
    )
    want = full[: full.find(stop)]
    (o,) = llm.generate([p], greedy(24, stop=[stop]))
    assert o.finish_reason == "stop"
    assert o.text == want and stop not in o.text
    assert len(o.token_ids) < 24
    # streamed: the deltas never carry any part of the stop string
    deltas = asyncio.run(collect_stream(llm, p, greedy(24, stop=[stop])))
    assert "".join(d.text for d in deltas) == want
    assert deltas[-1].finished and deltas[-1].finish_reason == "stop"
    assert_no_leak(llm)


async def collect_stream(llm, prompt, params, request_id=None):
    return [d async for d in llm.stream(prompt, params, request_id=request_id)]


def test_stream_deltas_concatenate_to_final_text(llm, hf_ref, tokenizer):
    prompt = "Once upon a time 🦙"
    ids = tokenizer.encode(prompt)
    deltas = asyncio.run(collect_stream(llm, prompt, greedy(20)))
    (final,) = llm.generate(prompt, greedy(20))
    assert "".join(d.text for d in deltas) == final.text
    assert [t for d in deltas for t in d.token_ids] == final.token_ids == hf_ref.greedy(ids, 20)
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert deltas[-1].finish_reason == "length" and deltas[-1].num_output_tokens == 20
    assert all(d.num_prompt_tokens == len(ids) for d in deltas)
    assert [d.num_output_tokens for d in deltas] == sorted(d.num_output_tokens for d in deltas)


def test_lagging_stream_gets_merged_deltas(llm, hf_ref, tokenizer):
    """A consumer that falls behind receives what queued up as one delta (fewer, larger chunks),
    with nothing lost: ids, text and counts equal an unhurried stream's."""
    prompt = "Once upon a time 🦙"
    ids = tokenizer.encode(prompt)

    async def slow():
        out = []
        stream = llm.submit(prompt, greedy(40))
        async for d in stream:
            out.append(d)
            if len(out) == 1:
                # wait (however long the machine takes) until the request's final delta is queued
                # for this stream: the whole request finished while this consumer lagged
                q = stream._st.queue
                deadline = time.monotonic() + 60
                while not (q.qsize() and q._queue[-1].finished):
                    assert time.monotonic() < deadline, q.qsize()
                    await asyncio.sleep(0.02)
        return out

    deltas = asyncio.run(slow())
    (final,) = llm.generate(prompt, greedy(40))
    assert len(deltas) == 2  # the first delta, then everything else at once
    assert [t for d in deltas for t in d.token_ids] == final.token_ids == hf_ref.greedy(ids, 40)
    assert "".join(d.text for d in deltas) == final.text
    assert deltas[-1].finished and deltas[-1].finish_reason == "length" and deltas[-1].num_output_tokens == 40


def test_stream_interval_sends_a_delta_every_n_tokens(tiny_model_dir, hf_ref, tokenizer):
    """stream_interval=4: the first token at once, then deltas of at least 4 tokens (the last may
    be shorter); ids and text equal the whole output's."""
    prompt = "Once upon a time 🦙"
    ids = tokenizer.encode(prompt)
    eng = LLM(str(tiny_model_dir), context_len=CONTEXT_LEN, stream_interval=4)
    try:
        deltas = asyncio.run(collect_stream(eng, prompt, greedy(22)))
        (final,) = eng.generate(prompt, greedy(22))
    finally:
        eng.shutdown()
    sizes = [len(d.token_ids) for d in deltas]
    assert sizes[0] == 1 and all(n >= 4 for n in sizes[1:-1]) and len(deltas) <= 1 + -(-21 // 4), sizes
    assert [t for d in deltas for t in d.token_ids] == final.token_ids == hf_ref.greedy(ids, 22)
    assert "".join(d.text for d in deltas) == final.text
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    with pytest.raises(ValueError, match="stream_interval"):
        LLM(str(tiny_model_dir), stream_interval=0)


def test_concurrent_streams(llm, hf_ref):
    prompts = [random_prompt(n, seed=1000 + n) for n in (3, 40, 90)]

    async def main():
        return await asyncio.gather(*(collect_stream(llm, p, greedy(10)) for p in prompts))

    for p, deltas in zip(prompts, asyncio.run(main())):
        assert [t for d in deltas for t in d.token_ids] == hf_ref.greedy(p, 10)


def test_prompt_longer_than_context_raises(llm):
    too_long = random_prompt(CONTEXT_LEN, seed=1100)
    with pytest.raises(ValueError, match="context"):
        llm.generate([too_long], greedy(4))
    with pytest.raises(ValueError, match="context"):
        llm.generate([random_prompt(10, seed=1101), too_long], greedy(4))  # nothing half-submitted

    async def stream_too_long():
        async for _ in llm.stream(too_long, greedy(4)):
            pass

    with pytest.raises(ValueError, match="context"):
        asyncio.run(stream_too_long())
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], greedy(4))
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate(["hi"], SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="sampling params"):
        llm.generate(["a", "b"], [greedy(2)] * 3)
    for bad in ([5, True, 7], [5, 6.0], [5, "6"], [[5]]):  # a prompt is text or a list of ints, bools not
        with pytest.raises(TypeError, match="token ids"):
            llm.generate([[1, 2], bad], greedy(2))
    assert_no_leak(llm)
    # still serving
    (o,) = llm.generate([random_prompt(CONTEXT_LEN - 1, seed=1102)], greedy(4))
    assert o.finish_reason == "length" and len(o.token_ids) == 1  # one token of room


def test_abort_during_stream_frees_slots(llm):
    async def main():
        got = []
        agen = llm.stream(random_prompt(60, seed=1200), greedy(400), request_id="to-abort")
        async for d in agen:
            got.append(d)
            if len(got) == 3:
                llm.abort("to-abort")
            if len(got) > 50:
                break
        return got

    got = asyncio.run(asyncio.wait_for(main(), timeout=30))
    assert len(got) < 20, "the stream kept going after abort"
    assert got[-1].finished and got[-1].finish_reason == "abort"
    st = wait_idle(llm)
    assert st["free_slots"] + st["cached_slots"] == st["num_slots"]


def test_cancelled_stream_aborts_request(llm):
    async def main():
        agen = llm.stream(random_prompt(40, seed=1300), greedy(400))
        n = 0
        async for _ in agen:
            n += 1
            if n == 2:
                break
        await agen.aclose()  # what `async with aclosing(...)` / task cancellation does

    asyncio.run(asyncio.wait_for(main(), timeout=30))
    assert_no_leak(llm)


def test_abort_in_generate_from_another_thread(llm, monkeypatch):
    import threading

    # the engine holds its steps once the request has 3 tokens until the abort was sent, so the
    # 450-token request cannot run to its end before the other thread gets to abort it
    aborted = threading.Event()
    worker = llm.core.executor.worker
    real = worker.execute_async

    def held(batch):
        with llm.processor.lock:
            states = list(llm.processor.states.values())
        if states and len(states[0].token_ids) >= 3:
            assert aborted.wait(60)
        return real(batch)

    monkeypatch.setattr(worker, "execute_async", held)

    def abort_after_3_tokens():
        deadline = time.time() + 60
        while time.time() < deadline:
            with llm.processor.lock:
                states = list(llm.processor.states.values())
            if states and len(states[0].token_ids) >= 3:
                llm.abort(states[0].request_id)
                aborted.set()
                return
            time.sleep(0.005)

    t = threading.Thread(target=abort_after_3_tokens)
    t.start()
    (o,) = llm.generate([random_prompt(30, seed=1400)], greedy(450))
    t.join()
    assert o.finish_reason == "abort" and 3 <= len(o.token_ids) < 450
    assert_no_leak(llm)


def test_pipeline_config(tiny_model_dir):
    """Pipeline lanes: pp_size + 1 by default, as set, 1 without a pipeline; bad values refused."""
    from nanovllmx.config import EngineConfig

    m = str(tiny_model_dir)
    assert EngineConfig(m, pp_size=2).pipeline_lanes == 3  # CPU: no overlap scheduling by default
    on = EngineConfig(m, pp_size=2, overlap_scheduling=True)
    assert on.pipeline_lanes == 2 and on.pipeline_overlap
    assert not EngineConfig(m, pp_size=2, pp_inflight_batches=1, overlap_scheduling=True).pipeline_overlap
    assert EngineConfig(m, pp_size=2, pp_inflight_batches=2).pipeline_lanes == 2
    assert EngineConfig(m, pp_inflight_batches=4).pipeline_lanes == 1
    assert EngineConfig(m, tp_size=2, tp_allreduce="one_shot").tp_allreduce == "one_shot"
    with pytest.raises(ValueError, match="pp_inflight_batches"):
        EngineConfig(m, pp_size=2, pp_inflight_batches=0)
    with pytest.raises(ValueError, match="tp_allreduce"):
        EngineConfig(m, tp_allreduce="nvls")
