"""Prefix-cache routing across replicas (serve/router.py, serve/ingress.py): the radix tree's block
hashes follow inserts and evictions, the router's choice with fake replicas, and end to end on CPU
with 2 demo replicas: every turn of a conversation lands where its prefix is cached."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from nanovllmx.scheduler.allocator import SlotAllocator
from nanovllmx.scheduler.radix_cache import BLOCK_SIZE, RadixCache, block_hashes
from nanovllmx.serve.router import ReplicaView, decode_summary, encode_summary, matched_blocks, rank_replicas
from tests.helpers import free_port

B = BLOCK_SIZE


# ------------------------------------------------------------------ the radix tree's summary
def _tree(n: int = 4096) -> RadixCache:
    return RadixCache(SlotAllocator(n))


def _insert(tree: RadixCache, tokens: list[int]) -> None:
    slots = tree.allocator.alloc(len(tokens))
    assert slots is not None
    n = tree.insert(tokens, slots)
    tree.allocator.free(np.asarray(slots)[:n])


def test_block_hashes_follow_insert_split_and_evict():
    tree = _tree()
    a = list(range(1000, 1000 + 3 * B + 10))  # 3 full blocks
    _insert(tree, a)
    assert set(tree.prefix_summary(100)) == set(block_hashes(a)) and len(block_hashes(a)) == 3
    # shares 1.5 blocks with a: splits a's edge mid-block 2; adds its own blocks 2..3
    b = a[: B + B // 2] + list(range(5000, 5000 + 2 * B))
    _insert(tree, b)
    assert set(tree.prefix_summary(100)) == set(block_hashes(a)) | set(block_hashes(b))
    assert block_hashes(a)[0] == block_hashes(b)[0] and block_hashes(a)[1] != block_hashes(b)[1]
    # evicting everything empties the summary; evicting a's private tail drops only its blocks
    tree.evict(len(a) - (B + B // 2))  # LRU: a's leaf goes first
    assert set(tree.prefix_summary(100)) == set(block_hashes(b))
    tree.evict(10**6)
    assert tree.prefix_summary(100) == []
    assert tree.prefix_summary(2) == []
    _insert(tree, a)
    assert tree.prefix_summary(2) == block_hashes(a)[1:]  # newest first kept
    assert decode_summary(encode_summary(block_hashes(a))) == frozenset(block_hashes(a))


# ------------------------------------------------------------------ the choice, fake replicas
def _req(n_blocks: int, seed: int = 0) -> tuple[list[int], list[int]]:
    ids = random.Random(seed).sample(range(100_000), n_blocks * B)
    return ids, block_hashes(ids)


def test_longest_prefix_wins():
    ids, h = _req(8)
    reps = [ReplicaView("a", set(h[:2]), 0), ReplicaView("b", set(h[:6]), 0), ReplicaView("c", set(), 0)]
    assert rank_replicas(h, len(ids), reps)[0] == ["b"]
    assert matched_blocks(h, set(h[1:])) == 0  # a chain: no first block, no prefix


def test_load_breaks_ties_and_overrides_a_tiny_prefix():
    ids, h = _req(8)
    reps = [ReplicaView("a", set(h[:4]), 3), ReplicaView("b", set(h[:4]), 1)]
    assert rank_replicas(h, len(ids), reps)[0] == ["b"]
    # one block (64 tokens) cached on a busy replica: the idle one wins
    reps = [ReplicaView("a", set(h[:1]), 6), ReplicaView("b", set(), 0)]
    assert rank_replicas(h, len(ids), reps)[0] == ["b"]
    # a long prefix keeps its replica through a small imbalance
    reps = [ReplicaView("a", set(h[:8]), 2), ReplicaView("b", set(), 0)]
    assert rank_replicas(h, len(ids), reps)[0] == ["a"]
    # ... but not when it has no KV slots left for the rest of the prompt
    ids2, h2 = _req(40, 1)
    reps = [ReplicaView("a", set(h2[:2]), 0, free_slots=0), ReplicaView("b", set(), 0, free_slots=100_000)]
    assert rank_replicas(h2, len(ids2), reps)[0] == ["b"]
    # the rest follow as the fallback rank (if the best one is full)
    assert rank_replicas(h, len(ids), [ReplicaView("a", set(h), 0), ReplicaView("b", set(), 0)]) == [["a"], ["b"]]


def test_no_prefix_falls_back_to_two_random_choices():
    ids, h = _req(4)
    reps = [ReplicaView(i, set(), 0) for i in range(6)]
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        ranks = rank_replicas(h, len(ids), reps, rng=rng)
        assert len(ranks) == 1 and len(ranks[0]) == 2 and ranks[0][0] != ranks[0][1]
        seen.update(ranks[0])
    assert seen == set(range(6))
    # no token ids at all (health, models): the same
    assert len(rank_replicas([], 0, reps, rng=rng)[0]) == 2


# ------------------------------------------------------------------ end to end, 2 replicas


@pytest.mark.timeout(240)
def test_conversations_stay_on_their_replica():
    import httpx
    import ray
    from ray import serve

    from nanovllmx.serve import build_app
    from nanovllmx.serve.model_resolver import DEMO_MODEL_NAME

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="serve")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(
        {
            "model": DEMO_MODEL_NAME,
            "context_len": 2048,
            "max_bs": 8,
            "device": "cpu",
            "num_replicas": 2,
            "ray_actor_options": {"num_cpus": 0.5},
        }
    )
    t0 = time.monotonic()
    serve.run(app, name="test-router", route_prefix="/")
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        rng = random.Random(0)
        words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "lamp", "tiger", "maple"]
        convs: list[list[dict]] = [[] for _ in range(4)]
        prev_prompt = [0] * 4
        prompt_tokens = cached = 0
        for turn in range(3):
            for c, msgs in enumerate(convs):
                msgs.append({"role": "user", "content": " ".join(rng.choice(words) for _ in range(120))})
                r = http.post(
                    "/v1/chat/completions",
                    json={"model": DEMO_MODEL_NAME, "messages": msgs, "max_tokens": 8, "temperature": 0},
                )
                assert r.status_code == 200, r.text
                body = r.json()
                usage = body["usage"]
                hit = usage["prompt_tokens_details"]["cached_tokens"]
                if turn:  # the previous turn's prompt is cached where this one went
                    assert hit >= 0.8 * prev_prompt[c], (turn, c, hit, prev_prompt[c])
                    prompt_tokens += usage["prompt_tokens"]
                    cached += hit
                prev_prompt[c] = usage["prompt_tokens"]
                msgs.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
        print(f"\n2 replicas, turns 2-3: hit rate {cached / prompt_tokens:.3f}; {time.monotonic() - t0:.1f} s")
        assert http.get("/v1/models").json()["data"][0]["id"] == DEMO_MODEL_NAME
        assert http.get("/health").status_code == 200
        # through the ingress: several prompts (the router reads the first) x n, logprobs; /tokenize
        r = http.post(
            "/v1/completions",
            json={
                "prompt": ["one two", "three four"],
                "n": 2,
                "max_tokens": 3,
                "temperature": 0,
                "logprobs": 1,
                "return_token_ids": True,
            },
        )
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert [c["index"] for c in choices] == [0, 1, 2, 3]
        tok = http.post("/tokenize", json={"prompt": "three four"}).json()["tokens"]
        assert [c["prompt_token_ids"] == tok for c in choices] == [False, False, True, True]
        assert all(len(c["logprobs"]["tokens"]) == 3 for c in choices)
        http.close()
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
