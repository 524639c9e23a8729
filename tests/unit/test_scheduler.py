"""Scheduler unit tests, no model.

`FakeWorker` plays the worker's part from the ScheduledBatch alone, exactly as the real one must:
it keeps its own req_to_token table (applying the batch's table writes and out_slots) and a "KV
pool" whose entry for a slot is the whole token sequence that produced it. For each request in a
batch it checks that every slot of its context holds the right prefix (so a wrong slot, a stale or
evicted cache entry, a wrong input id or position shows up), and its "model" samples a
deterministic function of that context. The tokens a request gets must therefore equal a direct
greedy run of the same function, however the scheduler chunks, batches, caches, preempts and
resumes it.
"""

from __future__ import annotations

import random
import zlib

import numpy as np
import pytest

from nanovllmx.sampling_params import SamplingParams
from nanovllmx.scheduler.request import EngineRequest, Status
from nanovllmx.scheduler.scheduler import Scheduler

EOS = 151645


def fake_lm(seq: tuple[int, ...]) -> int:
    """Next token of the fake model: a hash of the whole context, never EOS."""
    return 100 + zlib.crc32(np.asarray(seq, dtype=np.int64).tobytes()) % 5000


def reference(prompt: list[int], max_tokens: int, lm=fake_lm) -> list[int]:
    seq = list(prompt)
    for _ in range(max_tokens):
        seq.append(lm(tuple(seq)))
    return seq[len(prompt) :]


class FakeWorker:
    def __init__(self, max_bs: int, context_len: int, lm=fake_lm):
        self.table = np.zeros((max_bs + 1, context_len), dtype=np.int64)
        self.kv: dict[int, tuple[int, ...]] = {}
        self.lm = lm
        self.next_tok = np.full(max_bs + 1, -1, dtype=np.int64)  # last token sampled per row
        self.sampled_at = np.zeros(max_bs + 1, dtype=np.int64)  # the step that sampled it

    def execute(self, b) -> np.ndarray:
        assert b.input_ids.dtype == np.int32 and b.out_slots.dtype == np.int32
        assert len(b.input_ids) == len(b.out_slots) == int(b.q_lens.sum())
        assert len(set(b.out_slots.tolist())) == len(b.out_slots), "one slot written twice in a step"
        assert (b.out_slots >= 1).all(), "slot 0 is the padding slot"
        assert len(set(b.req_indices.tolist())) == b.num_reqs
        if len(b.table_rows):
            self.table[b.table_rows, b.table_cols] = b.table_slots
        ids = b.input_ids.astype(np.int64)
        if b.has_placeholders:  # overlap scheduling: the previous step's sample, kept per row
            rows = np.repeat(b.req_indices, b.q_lens)
            ids = np.where(ids < 0, self.next_tok[rows], ids)
            assert (ids >= 0).all(), "placeholder for a row that has no sampled token"
        else:
            assert (ids >= 0).all()
        t = 0
        last: list[tuple[int, ...]] = []
        for r, start, q in zip(b.req_indices.tolist(), b.start_pos.tolist(), b.q_lens.tolist()):
            assert q >= 1
            for p in range(start, start + q):
                slot = int(b.out_slots[t])
                self.table[r, p] = slot
                prev = self.kv[int(self.table[r, p - 1])] if p else ()
                assert len(prev) == p
                self.kv[slot] = prev + (int(ids[t]),)
                t += 1
            ctx = self.kv[int(self.table[r, start + q - 1])]
            for p in range(start + q):  # attention reads every slot of the context
                assert self.kv.get(int(self.table[r, p])) == ctx[: p + 1], f"row {r}: slot of position {p} is wrong"
            last.append(ctx)
        out = np.array([self.lm(last[i]) for i in b.sample_rows.tolist()], dtype=np.int32)
        self.next_tok[b.req_indices[b.sample_rows]] = out
        self.sampled_at[b.req_indices[b.sample_rows]] = b.step
        return out


def make(num_slots=512, max_bs=8, context_len=128, budget=64, prefix=True, lm=fake_lm, lanes=1, lanes_overlap=False):
    s = Scheduler(
        num_slots,
        max_bs,
        context_len,
        budget,
        [EOS],
        enable_prefix_caching=prefix,
        lanes=lanes,
        lanes_overlap=lanes_overlap,
    )
    return s, FakeWorker(max_bs, context_len, lm)


def er(rid: str, prompt: list[int], **kw) -> EngineRequest:
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0.0)
    return EngineRequest(rid, list(prompt), SamplingParams(**kw))


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 150000) for _ in range(n)]


def check_slots(s: Scheduler) -> None:
    """Every slot is free, owned by the tree, or privately owned by exactly one running request."""
    private = sum(r.num_computed - r.prefix_len for r in s.running)
    assert s.allocator.num_free + s.tree.total_size() + private == s.num_slots
    owned = [s.tree.all_slots()] + [s.table[r.req_idx, r.prefix_len : r.num_computed] for r in s.running]
    owned = np.concatenate(owned)
    assert len(np.unique(owned)) == len(owned), "a slot has two owners"
    assert s.allocator.is_allocated(owned).all()
    for r in s.running:  # a request's tree prefix is the tree's slots for its tokens
        assert r.status == Status.RUNNING and r.req_idx is not None
    assert len(s.running) <= s.max_bs
    assert len(set(r.req_idx for r in s.running)) == len(s.running)


def check_idle(s: Scheduler) -> None:
    assert not s.running and not s.waiting and not s.requests
    assert s.allocator.num_free + s.tree.total_size() == s.num_slots
    assert s.tree.protected_size == 0
    st = s.stats()
    assert st.free_slots + st.cached_slots == st.num_slots


class Run:
    """Drives a scheduler + fake worker, checking invariants every step."""

    def __init__(self, s: Scheduler, w: FakeWorker, overlap: bool = False):
        """overlap: like the engine's overlap scheduling, step N+1 is scheduled and run before
        step N's tokens are applied. A scheduler with lanes > 1 runs like the engine's pipeline:
        up to `lanes` steps launched before the oldest one's tokens are applied."""
        self.s, self.w, self.overlap = s, w, overlap
        self.inflight = None
        self.queue: list = []  # lanes: sampled ids of the launched steps, oldest first
        self.tokens: dict[str, list[int]] = {}
        self.finish: dict[str, str] = {}
        self.cached: dict[str, int] = {}
        self.batches = []
        self.events: list[tuple[int, str, int]] = []  # (step, request id, token)

    def add(self, req: EngineRequest) -> None:
        self.s.add_request(req)
        self.tokens[req.request_id] = []

    def collect(self, outs) -> None:
        for o in outs:
            assert o.request_id not in self.finish, f"output after finish for {o.request_id}"
            self.tokens[o.request_id].extend(o.new_token_ids)
            for t in o.new_token_ids:
                self.events.append((self.s.step_id, o.request_id, t))
            self.cached[o.request_id] = o.num_cached_tokens
            if o.finish_reason is not None:
                self.finish[o.request_id] = o.finish_reason

    def step(self, between=None):
        """One engine step; `between(batch)` runs after schedule and before update (e.g. an abort)."""
        s = self.s
        if self.overlap:
            return self._step_overlap(between)
        if s.lanes > 1:
            return self._step_lanes(between)
        b = s.schedule()
        check_slots(s)
        if b is None:
            self.collect(s.take_pending_outputs())
            return None
        assert b.num_tokens <= s.budget, "token budget exceeded"
        assert b.num_reqs <= s.max_bs
        self.batches.append(b)
        sampled = self.w.execute(b)
        if between is not None:
            between(b)
        self.collect(s.update(sampled))
        check_slots(s)
        return b

    def _step_overlap(self, between):
        s = self.s
        b = s.schedule()
        check_slots(s)
        sampled = None
        if b is not None:
            assert b.num_tokens <= s.budget, "token budget exceeded"
            self.batches.append(b)
            sampled = self.w.execute(b)
        if between is not None and b is not None:
            between(b)
        if self.inflight is not None:
            self.collect(s.update(self.inflight))
        else:
            self.collect(s.take_pending_outputs())
        self.inflight = sampled
        check_slots(s)
        return b

    def _step_lanes(self, between):
        """EngineCore.step with depth = lanes: launch, and apply the oldest step once `lanes` are
        in flight or nothing new could be scheduled."""
        s = self.s
        depth = s.lanes + int(s.lanes_overlap)  # as EngineCore
        inflight = {id(r) for batch in s._inflight for r in batch}  # requests whose sample is in flight
        recent = {id(r) for batch in list(s._inflight)[len(s._inflight) - s.lanes + 1 :] for r in batch}
        b = s.schedule() if len(self.queue) < depth else None
        check_slots(s)
        if b is not None:
            assert b.num_tokens <= s.budget, "token budget exceeded"
            by_row = {r.req_idx: r for r in s.running}
            ids = {id(by_row[i]) for i in b.req_indices.tolist()}
            if s.lanes_overlap:
                # placeholders only for steps the first stage receives from the last stage before
                # this batch, `lanes` launches back at least: never one of the last lanes - 1 steps
                assert not recent & ids, "a request with a sample in a recent step was scheduled"
                rows = np.repeat(b.req_indices, b.q_lens)[b.input_ids < 0]
                assert (self.w.sampled_at[rows] <= b.resolve_until).all(), "placeholder of an unresolved step"
            else:
                assert not b.has_placeholders, "a pipeline's first stage cannot resolve placeholders"
                # a request whose sample is in flight is in no later batch until it is back
                assert not inflight & ids, "a request was scheduled twice"
            self.batches.append(b)
            self.queue.append(self.w.execute(b))
            if between is not None:
                between(b)
        if self.queue and (b is None or len(self.queue) >= depth):
            self.collect(s.update(self.queue.pop(0)))
        else:
            self.collect(s.take_pending_outputs())
        check_slots(s)
        return b

    def until_idle(self, max_steps=5000) -> None:
        for _ in range(max_steps):
            if not self.s.has_work():
                break
            self.step()
        else:
            raise AssertionError("scheduler did not finish (livelock?)")
        check_idle(self.s)


# ------------------------------------------------------------------ correctness through the fake LM
def test_single_request_matches_reference():
    s, w = make()
    r = Run(s, w)
    p = prompt(20, 0)
    r.add(er("a", p, max_tokens=10))
    r.until_idle()
    assert r.tokens["a"] == reference(p, 10)
    assert r.finish["a"] == "length"


def test_mixed_batch_matches_reference():
    s, w = make(budget=4096, context_len=400, num_slots=4096)
    r = Run(s, w)
    lens = [5, 300, 17, 64, 1, 129]
    for i, n in enumerate(lens):
        r.add(er(f"r{i}", prompt(n, i), max_tokens=6))
    b = r.step()
    assert b.num_reqs == len(lens) and b.num_tokens == sum(lens)  # everything admitted in one step
    r.until_idle()
    for i, n in enumerate(lens):
        assert r.tokens[f"r{i}"] == reference(prompt(n, i), 6)


@pytest.mark.parametrize("overlap", [False, True])
def test_rows_longest_context_first(overlap):
    """A step's rows go out longest context first (the attention kernel starts a block per row in
    row order: a long one started last would run alone at the end), in prefill and decode steps,
    and the tokens do not depend on it."""
    s, w = make(budget=4096, context_len=400, num_slots=4096)
    r = Run(s, w, overlap=overlap)
    lens = [5, 300, 17, 64, 1, 129]
    for i, n in enumerate(lens):
        r.add(er(f"r{i}", prompt(n, i), max_tokens=6 + i))  # they finish at different steps
    r.until_idle()
    assert len(r.batches) > 6
    for b in r.batches:
        ctx = (b.start_pos + b.q_lens).tolist()
        assert ctx == sorted(ctx, reverse=True)
    assert r.batches[0].q_lens.tolist() == sorted(lens, reverse=True)
    for i, n in enumerate(lens):
        assert r.tokens[f"r{i}"] == reference(prompt(n, i), 6 + i)


def test_fcfs_order():
    s, w = make(budget=32, max_bs=2)
    r = Run(s, w)
    for i in range(5):
        r.add(er(f"r{i}", prompt(10 + i, i), max_tokens=3))
    r.until_idle()
    first = {}
    for step, rid, _ in r.events:
        first.setdefault(rid, step)
    order = sorted(first, key=lambda k: (first[k], k))
    assert order == [f"r{i}" for i in range(5)]
    done = sorted(r.finish)  # all finished
    assert done == [f"r{i}" for i in range(5)]
    # max_bs=2: r2 starts only after r0 finished
    last_r0 = max(step for step, rid, _ in r.events if rid == "r0")
    assert first["r2"] > last_r0


def test_fcfs_no_overtaking_when_head_does_not_fit():
    # r0 holds most of the pool; r1 (big) cannot be admitted; r2 (small) would fit but must wait behind r1
    s, w = make(num_slots=128, context_len=128, budget=256)
    r = Run(s, w)
    r.add(er("r0", prompt(80, 0), max_tokens=20))
    r.step()
    r.add(er("r1", prompt(60, 1), max_tokens=2))
    r.add(er("r2", prompt(4, 2), max_tokens=2))
    while "r0" not in r.finish:
        r.step()
        assert not r.tokens["r2"] or r.tokens["r1"], "r2 overtook r1"
    r.until_idle()
    assert r.tokens["r1"] == reference(prompt(60, 1), 2)
    assert r.tokens["r2"] == reference(prompt(4, 2), 2)


def test_chunked_prefill_respects_budget_and_keeps_decoding():
    budget = 16
    s, w = make(budget=budget, context_len=256)
    r = Run(s, w)
    r.add(er("short", prompt(5, 1), max_tokens=40))
    r.step()
    r.step()
    r.add(er("long", prompt(200, 2), max_tokens=4))
    n_before = len(r.tokens["short"])
    steps = 0
    while not r.tokens["long"]:
        b = r.step()
        steps += 1
        assert b.num_tokens <= budget
    # the long prompt took many steps and the running request decoded in every one of them
    assert steps >= 200 // budget
    assert len(r.tokens["short"]) - n_before == steps
    r.until_idle()
    assert r.tokens["short"] == reference(prompt(5, 1), 40)
    assert r.tokens["long"] == reference(prompt(200, 2), 4)
    assert all(b.num_tokens <= budget for b in r.batches)


@pytest.mark.parametrize("budget", [2, 3, 5, 7])
def test_one_token_prefill_chunks(budget):
    """A budget remainder of one token gives a prefill chunk of length 1 next to decodes: it must
    carry the prompt token at its position, not the request's last token."""
    s, w = make(budget=budget, context_len=64)
    r = Run(s, w)
    r.add(er("a", prompt(3, 0), max_tokens=20))
    r.add(er("b", prompt(4, 1), max_tokens=20))
    r.add(er("c", prompt(23, 2), max_tokens=5))
    r.until_idle()
    for rid, n, seed, m in (("a", 3, 0, 20), ("b", 4, 1, 20), ("c", 23, 2, 5)):
        assert r.tokens[rid] == reference(prompt(n, seed), m), rid


def test_admission_bounded_by_free_slots_and_max_bs():
    s, w = make(num_slots=100, context_len=64, budget=1000, max_bs=8)
    r = Run(s, w)
    for i in range(6):
        r.add(er(f"r{i}", prompt(30, i), max_tokens=10))
    b = r.step()
    # 30-token prompts: only 3 fit in 100 slots (each keeps room for one decode token)
    assert b.num_reqs == 3 and len(s.waiting) == 3
    r.until_idle()
    for i in range(6):
        assert r.tokens[f"r{i}"] == reference(prompt(30, i), 10)
    s, w = make(num_slots=1000, context_len=64, budget=1000, max_bs=2)
    r = Run(s, w)
    for i in range(5):
        r.add(er(f"r{i}", prompt(3, i), max_tokens=4))
    b = r.step()
    assert b.num_reqs == 2
    r.until_idle()


def test_preemption_instead_of_crash():
    s, w = make(num_slots=64, context_len=64, budget=256)
    r = Run(s, w)
    for i in range(4):
        r.add(er(f"r{i}", prompt(12, i), max_tokens=40))
    r.until_idle()
    assert s.num_preempted_total > 0
    for i in range(4):
        assert r.tokens[f"r{i}"] == reference(prompt(12, i), 40)
        assert r.finish[f"r{i}"] == "length"


def test_preemption_without_prefix_cache():
    s, w = make(num_slots=64, context_len=64, budget=256, prefix=False)
    r = Run(s, w)
    for i in range(4):
        r.add(er(f"r{i}", prompt(12, i), max_tokens=40))
    r.until_idle()
    assert s.num_preempted_total > 0
    assert s.tree.total_size() == 0
    for i in range(4):
        assert r.tokens[f"r{i}"] == reference(prompt(12, i), 40)


def test_prefix_cache_hit_and_correct_reuse():
    s, w = make(num_slots=512, context_len=128, budget=64)
    r = Run(s, w)
    shared = prompt(50, 7)
    r.add(er("a", shared + [11, 12, 13], max_tokens=5))
    r.until_idle()
    assert r.cached["a"] == 0
    r.add(er("b", shared + [21, 22], max_tokens=5))
    r.add(er("c", shared + [11, 12, 13], max_tokens=5))  # exact repeat: all but the last token cached
    r.until_idle()
    assert r.cached["b"] == 50
    assert r.cached["c"] == 52
    assert s.cached_prompt_tokens_total == 102
    assert r.tokens["b"] == reference(shared + [21, 22], 5)
    assert r.tokens["c"] == reference(shared + [11, 12, 13], 5) == r.tokens["a"]
    # the generated tokens are cached too: a follow-up turn reuses prompt + answer
    follow = shared + [11, 12, 13] + r.tokens["a"][:4] + [99]
    r.add(er("d", follow, max_tokens=3))
    r.until_idle()
    assert r.cached["d"] == len(follow) - 1
    assert r.tokens["d"] == reference(follow, 3)


def test_prefix_caching_disabled():
    s, w = make(prefix=False)
    r = Run(s, w)
    p = prompt(40, 3)
    r.add(er("a", p, max_tokens=4))
    r.until_idle()
    r.add(er("b", p, max_tokens=4))
    r.until_idle()
    assert r.cached["b"] == 0 and s.tree.total_size() == 0
    assert s.allocator.num_free == s.num_slots
    assert r.tokens["a"] == r.tokens["b"] == reference(p, 4)


def test_eviction_under_pressure_stays_correct():
    s, w = make(num_slots=128, context_len=128, budget=64, max_bs=4)
    r = Run(s, w)
    base = prompt(30, 0)
    prompts = {}
    for i in range(12):  # more distinct prompts than the pool holds: the tree must evict
        p = (base if i % 2 else []) + prompt(20 + 3 * i, 100 + i)
        prompts[f"r{i}"] = p
        r.add(er(f"r{i}", p, max_tokens=6))
        if i % 3 == 2:
            r.until_idle()
    r.until_idle()
    for rid, p in prompts.items():
        assert r.tokens[rid] == reference(p, 6), rid
    assert s.tree.total_size() <= s.num_slots


# ------------------------------------------------------------------ finishing
def test_finish_on_max_tokens():
    s, w = make()
    r = Run(s, w)
    r.add(er("a", prompt(5, 0), max_tokens=1))
    r.add(er("b", prompt(5, 1), max_tokens=7))
    r.until_idle()
    assert len(r.tokens["a"]) == 1 and len(r.tokens["b"]) == 7
    assert r.finish == {"a": "length", "b": "length"}


def _lm_emitting(token: int, at: int):
    """A fake LM that emits `token` as its `at`-th generated token (context length `at` beyond 10)."""

    def lm(seq):
        return token if len(seq) == 10 + at - 1 else fake_lm(seq)

    return lm


def test_finish_on_eos():
    s, w = make(lm=_lm_emitting(EOS, 3))
    r = Run(s, w)
    r.add(er("a", prompt(10, 0), max_tokens=20))
    r.until_idle()
    assert r.finish["a"] == "stop"
    assert len(r.tokens["a"]) == 3 and r.tokens["a"][-1] == EOS


def test_ignore_eos_keeps_going():
    s, w = make(lm=_lm_emitting(EOS, 3))
    r = Run(s, w)
    r.add(er("a", prompt(10, 0), max_tokens=8, ignore_eos=True))
    r.until_idle()
    assert r.finish["a"] == "length"
    assert len(r.tokens["a"]) == 8 and r.tokens["a"][2] == EOS


def test_finish_on_stop_token_ids():
    s, w = make(lm=_lm_emitting(4242, 5))
    r = Run(s, w)
    r.add(er("a", prompt(10, 0), max_tokens=20, stop_token_ids=[4242]))
    r.add(er("b", prompt(10, 0), max_tokens=8))  # same tokens, but 4242 is not a stop token for it
    r.add(er("c", prompt(10, 0), max_tokens=8, ignore_eos=True, stop_token_ids=[4242]))
    r.until_idle()
    assert r.finish["a"] == "stop" and r.tokens["a"][-1] == 4242 and len(r.tokens["a"]) == 5
    assert r.finish["b"] == "length" and len(r.tokens["b"]) == 8
    assert r.finish["c"] == "stop" and len(r.tokens["c"]) == 5  # ignore_eos does not ignore stop_token_ids


def test_finish_at_context_length():
    s, w = make(context_len=32)
    r = Run(s, w)
    r.add(er("a", prompt(31, 0), max_tokens=100))  # longest allowed prompt: one token of room
    r.add(er("b", prompt(20, 1), max_tokens=100))
    r.until_idle()
    assert r.finish == {"a": "length", "b": "length"}
    assert len(r.tokens["a"]) == 1 and len(r.tokens["b"]) == 12


def test_bad_prompts_raise():
    s, _ = make(context_len=32)
    with pytest.raises(ValueError, match="empty"):
        s.add_request(er("e", []))
    with pytest.raises(ValueError, match="context"):
        s.add_request(er("l", prompt(32, 0)))
    with pytest.raises(ValueError, match="context"):
        s.add_request(er("l2", prompt(500, 0)))
    s.add_request(er("ok", prompt(3, 0)))
    with pytest.raises(ValueError, match="already in use"):
        s.add_request(er("ok", prompt(3, 0)))
    assert len(s.waiting) == 1


def test_pool_smaller_than_context_is_refused():
    """A pool that cannot hold one full context would livelock a long request (it preempts itself
    forever); refuse it up front."""
    with pytest.raises(ValueError, match="context"):
        Scheduler(32, 4, 64, 64, [EOS])


# ------------------------------------------------------------------ abort
def test_abort_waiting():
    s, w = make(max_bs=1)
    r = Run(s, w)
    r.add(er("a", prompt(10, 0), max_tokens=5))
    r.add(er("b", prompt(10, 1), max_tokens=5))
    r.step()
    assert s.requests["b"].status == Status.WAITING
    assert s.abort("b")
    assert not s.abort("b") and not s.abort("nope")
    r.until_idle()
    assert r.finish == {"a": "length", "b": "abort"}
    assert r.tokens["b"] == []


def test_abort_mid_prefill():
    s, w = make(budget=16, context_len=256)
    r = Run(s, w)
    r.add(er("long", prompt(100, 0), max_tokens=5))
    r.add(er("other", prompt(8, 1), max_tokens=12))
    r.step()
    r.step()
    req = s.requests["long"]
    assert req.status == Status.RUNNING and 0 < req.num_computed < 100
    assert s.abort("long")
    check_slots(s)
    r.until_idle()
    assert r.finish["long"] == "abort" and r.tokens["long"] == []
    assert r.tokens["other"] == reference(prompt(8, 1), 12)


def test_abort_while_decoding_and_between_schedule_and_update():
    s, w = make()
    r = Run(s, w)
    r.add(er("a", prompt(10, 0), max_tokens=30))
    r.add(er("b", prompt(12, 1), max_tokens=30))
    r.add(er("c", prompt(14, 2), max_tokens=10))
    for _ in range(4):
        r.step()
    assert s.abort("a")
    n_b = len(r.tokens["b"])
    r.step(between=lambda b: s.abort("b"))  # b's token of this step is dropped
    assert len(r.tokens["b"]) == n_b
    r.until_idle()
    assert r.finish == {"a": "abort", "b": "abort", "c": "length"}
    assert r.tokens["c"] == reference(prompt(14, 2), 10)
    assert r.tokens["a"] == reference(prompt(10, 0), 30)[: len(r.tokens["a"])]


def test_abort_all_frees_everything():
    s, w = make(num_slots=128, context_len=64, budget=32)
    r = Run(s, w)
    for i in range(6):
        r.add(er(f"r{i}", prompt(25, i), max_tokens=30))
    for _ in range(5):
        r.step()
    for i in range(6):
        s.abort(f"r{i}")
    r.until_idle()
    assert set(r.finish.values()) == {"abort"}


# ------------------------------------------------------------------ randomized
@pytest.mark.parametrize("seed", range(6))
def test_random_workload(seed):
    _random_workload(seed, overlap=False)


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_overlap(seed):
    """The same workloads with overlap scheduling: tokens identical, no slot leaks, aborts and
    preemptions while a sampled token is still in flight."""
    _random_workload(seed, overlap=True)


def test_eos_with_overlap_drops_the_step_in_flight():
    s, w = make(lm=_lm_emitting(EOS, at=3))
    r = Run(s, w, overlap=True)
    r.add(er("a", prompt(10, 5), max_tokens=50))
    r.until_idle()
    assert r.finish["a"] == "stop" and r.tokens["a"][-1] == EOS and len(r.tokens["a"]) == 3


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_pipeline_lanes(seed):
    """Inter-step pipelining (pp > 1): 2-4 steps of disjoint sampling requests in flight, prompt
    chunks of one request in consecutive steps; tokens identical, no slot leaks, aborts and
    preemptions while steps are in flight."""
    _random_workload(seed, overlap=False, lanes=2 + seed % 3)


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_pipeline_lanes_overlap(seed):
    """Lanes with pipeline overlap: one batch more in flight, whose placeholders refer only to steps
    at least `lanes` launches old (resolve_until)."""
    _random_workload(seed, overlap=False, lanes=2 + seed % 3, lanes_overlap=True)


@pytest.mark.parametrize("lanes_overlap", [False, True])
def test_lanes_split_the_decode_batch(lanes_overlap):
    s = Scheduler(512, 8, 128, 64, [EOS], lanes=2, lanes_overlap=lanes_overlap)
    w = FakeWorker(8, 128)
    r = Run(s, w)
    for i in range(6):
        r.add(er(f"r{i}", prompt(5, i), max_tokens=12))
    r.until_idle()
    decode = [b for b in r.batches if b.is_decode]
    assert decode and all(b.num_reqs == 3 for b in decode[2:-2]), [b.num_reqs for b in decode]
    # with overlap the decode batches go before the tokens they feed on are back here
    assert all(b.has_placeholders for b in decode[2:-2]) == lanes_overlap
    for i in range(6):
        assert r.tokens[f"r{i}"] == reference(prompt(5, i), 12)


def _random_workload(seed: int, overlap: bool, lanes: int = 1, lanes_overlap: bool = False) -> None:
    rng = random.Random(seed)
    ctx = 96
    s, w = make(
        num_slots=rng.choice([96, 128, 200, 400]),
        context_len=ctx,
        budget=rng.choice([1, 7, 16, 64, 200]),
        max_bs=rng.choice([1, 3, 8]),
        prefix=rng.random() < 0.8,
        lanes=lanes,
        lanes_overlap=lanes_overlap,
    )
    r = Run(s, w, overlap=overlap)
    shared = prompt(30, 1000 + seed)
    specs: dict[str, tuple[list[int], int]] = {}
    live: list[str] = []
    aborted: set[str] = set()
    for i in range(40):
        if rng.random() < 0.5:
            n = rng.randint(1, 60)
            p = (shared[: rng.randint(1, 30)] if rng.random() < 0.5 else []) + prompt(n, seed * 1000 + i)
            p = p[: ctx - 1]
            m = rng.randint(1, ctx - len(p))
            rid = f"r{i}"
            specs[rid] = (p, m)
            r.add(er(rid, p, max_tokens=m))
            live.append(rid)
        if live and rng.random() < 0.1:
            rid = live.pop(rng.randrange(len(live)))
            if s.abort(rid):
                aborted.add(rid)
        for _ in range(rng.randint(0, 4)):
            if s.has_work():
                r.step()
    r.until_idle()
    for rid, (p, m) in specs.items():
        ref = reference(p, m)
        if rid in aborted:
            assert r.finish[rid] == "abort"
            assert r.tokens[rid] == ref[: len(r.tokens[rid])]
        else:
            assert r.finish[rid] == "length", rid
            assert r.tokens[rid] == ref, rid


# ------------------------------------------------------------------ logprobs and logits processing
@pytest.mark.parametrize("overlap", [False, True])
def test_prompt_logprobs_plan_scores_each_prompt_position_once(overlap):
    # chunked prefill, a cached prefix (skipped while prompt logprobs are owed) and preemption: every
    # position 0..n-2 is planned exactly once, against the next prompt token
    s, w = make(num_slots=64, context_len=64, budget=10)
    r = Run(s, w, overlap=overlap)
    shared = prompt(12, 7)
    r.add(er("warm", shared + [5], max_tokens=2))
    r.until_idle()
    prompts = {f"r{i}": shared + prompt(3, i) for i in range(4)}
    for rid, p in prompts.items():
        r.add(er(rid, p, max_tokens=30, prompt_logprobs=2 if rid != "r3" else None))
    planned: dict[str, list[tuple[int, int]]] = {rid: [] for rid in prompts}
    seen = {}

    def record(b):
        if b.prompt_logprobs is None:
            return
        plan = b.prompt_logprobs
        starts = b.start_pos[plan.rows] + plan.offsets
        reqs = {req.req_idx: req.request_id for req in s.running}
        k = 0
        for row, st, n in zip(plan.rows.tolist(), starts.tolist(), plan.counts.tolist()):
            rid = reqs[int(b.req_indices[row])]
            planned[rid] += [(st + i, int(plan.targets[k + i])) for i in range(n)]
            k += n
        seen["top"] = set(plan.top.tolist())

    while s.has_work():
        r.step(between=record)
    assert s.num_preempted_total > 0
    for rid, p in prompts.items():
        assert r.tokens[rid] == reference(p, 30)
        want = [] if rid == "r3" else [(i, p[i + 1]) for i in range(len(p) - 1)]
        assert planned[rid] == want, rid
    assert r.cached["r3"] > 0 and all(r.cached[f"r{i}"] == 0 for i in range(3))
    assert seen["top"] == {2}


def test_plain_steps_skip_logits_processing_and_logprobs():
    s, w = make()
    r = Run(s, w)
    batches = []
    r.add(er("plain", prompt(5, 1), max_tokens=4))
    r.add(er("pen", prompt(6, 2), max_tokens=4, repetition_penalty=1.2, logit_bias={7: 1.0}, min_tokens=2))
    r.add(er("lp", prompt(7, 3), max_tokens=4, logprobs=3))
    while s.has_work():
        b = r.step()
        if b is not None:
            batches.append(b)
    first = batches[0]
    la, lp = first.sampling.logits, first.sampling.logprobs
    rows = np.argsort(first.q_lens)  # the rows of plain, pen, lp (prompts of 5, 6, 7): any row order
    assert la is not None and lp is not None and lp[rows].tolist() == [-1, -1, 3]
    assert la.repetition[rows].tolist() == pytest.approx([1, 1.2, 1])
    assert la.bias_ids[rows].tolist() == [[-1], [7], [-1]]
    assert la.banned[rows].tolist() == [[-1], [EOS], [-1]] and la.seq_lens[rows].tolist() == [5, 6, 7]
    # only the penalised request's ids go to the worker's token table, at admission
    assert first.hist_rows.tolist() == [int(first.req_indices[rows[1]])] * 6
    assert first.hist_cols.tolist() == list(range(6)) and first.hist_ids.tolist() == prompt(6, 2)
    assert s._num_special == 0
    r.add(er("plain2", prompt(5, 4), max_tokens=3))
    b = s.schedule()
    assert b.sampling.logits is None and b.sampling.logprobs is None and b.hist_rows is None
