"""Tests for the KV slot allocator and the radix-tree prefix cache."""

from __future__ import annotations

import random

import numpy as np
import pytest

from nanovllmx.scheduler.allocator import SlotAllocator
from nanovllmx.scheduler.radix_cache import CacheResult, RadixCache, TreeNode


# --------------------------------------------------------------------- helpers
def tree_contents(cache: RadixCache) -> dict[tuple[int, ...], int]:
    """Independent view of the tree: every cached prefix -> slot of its last token."""
    out: dict[tuple[int, ...], int] = {}
    stack: list[tuple[TreeNode, tuple[int, ...]]] = [(cache.root, ())]
    while stack:
        node, prefix = stack.pop()
        for first, child in node.children.items():
            assert int(child.key[0]) == first
            assert child.parent is node
            assert len(child.key) == len(child.value) > 0
            p = prefix
            for t, s in zip(child.key.tolist(), child.value.tolist()):
                p = p + (t,)
                out[p] = s
            stack.append((child, p))
    return out


def check_invariants(cache: RadixCache, alloc: SlotAllocator, held_privately: int = 0) -> None:
    slots = cache.all_slots()
    assert len(slots) == cache.total_size()
    assert len(np.unique(slots)) == len(slots), "slot owned twice by the tree"
    assert (slots >= 1).all() and (slots <= alloc.num_slots).all()
    assert alloc.is_allocated(slots).all(), "tree owns a slot the allocator thinks is free"
    # Recompute protected/evictable from scratch.
    prot = evic = 0
    stack = list(cache.root.children.values())
    while stack:
        n = stack.pop()
        if n.lock_ref > 0:
            prot += len(n.key)
            assert n.parent is cache.root or n.parent.lock_ref >= n.lock_ref
        else:
            evic += len(n.key)
        stack.extend(n.children.values())
    assert cache.protected_size == prot
    assert cache.evictable_size == evic
    assert alloc.num_free + cache.total_size() + held_privately == alloc.num_slots


def arr(*xs: int) -> np.ndarray:
    return np.array(xs, dtype=np.int32)


# ------------------------------------------------------------------- allocator
def test_allocator_accounting() -> None:
    a = SlotAllocator(10)
    assert a.num_free == 10
    x = a.alloc(4)
    assert x.dtype == np.int32 and len(x) == 4 and len(set(x.tolist())) == 4
    assert a.num_free == 6
    y = a.alloc(6)
    assert a.num_free == 0
    both = np.concatenate([x, y])
    assert sorted(both.tolist()) == list(range(1, 11)), "slot 0 must never be handed out"
    assert a.alloc(1) is None
    z = a.alloc(0)
    assert z is not None and len(z) == 0
    a.free(x)
    assert a.num_free == 4
    a.free(y.tolist())  # lists accepted
    assert a.num_free == 10
    # After churn the pool still never yields slot 0 or duplicates.
    w = a.alloc(10)
    assert sorted(w.tolist()) == list(range(1, 11))


def test_allocator_alloc_none_when_exhausted_keeps_state() -> None:
    a = SlotAllocator(3)
    assert a.alloc(4) is None
    assert a.num_free == 3
    a.alloc(2)
    assert a.alloc(2) is None
    assert a.num_free == 1


def test_allocator_double_free_and_range_errors() -> None:
    a = SlotAllocator(5)
    x = a.alloc(3)
    a.free(x[:1])
    with pytest.raises(ValueError):
        a.free(x[:1])  # double free
    with pytest.raises(ValueError):
        a.free([0])  # reserved dummy slot
    with pytest.raises(ValueError):
        a.free([6])  # out of range
    with pytest.raises(ValueError):
        a.free([int(x[1]), int(x[1])])  # duplicate in a single call
    # Failed frees must not have changed anything.
    assert a.num_free == 3
    a.free(x[1:])
    assert a.num_free == 5
    with pytest.raises(ValueError):
        a.free(x[1:])


# ------------------------------------------------------------------ radix tree
def make(n: int = 64, enabled: bool = True) -> tuple[SlotAllocator, RadixCache]:
    a = SlotAllocator(n)
    return a, RadixCache(a, enabled=enabled)


def insert_new(cache: RadixCache, alloc: SlotAllocator, tokens: list[int]) -> np.ndarray:
    """Insert tokens with fresh slots, freeing duplicates like the scheduler does."""
    slots = alloc.alloc(len(tokens))
    n = cache.insert(tokens, slots)
    alloc.free(slots[:n])
    return slots


def test_match_empty_tree() -> None:
    a, c = make()
    slots, node = c.match_prefix([1, 2, 3])
    assert len(slots) == 0 and node is c.root
    slots, node = c.match_prefix([])
    assert len(slots) == 0 and node is c.root
    assert c.total_size() == 0


def test_insert_then_match_full_and_partial_with_split() -> None:
    a, c = make()
    s = a.alloc(5)
    assert c.insert([1, 2, 3, 4, 5], s) == 0
    assert c.total_size() == 5 and c.evictable_size == 5

    got, node = c.match_prefix([1, 2, 3, 4, 5, 9])
    np.testing.assert_array_equal(got, s)
    assert node.key.tolist() == [1, 2, 3, 4, 5]

    got, node = c.match_prefix([1, 2, 3, 7])
    np.testing.assert_array_equal(got, s[:3])
    # The node was split so it covers exactly the matched prefix.
    assert node.key.tolist() == [1, 2, 3]
    assert node.value.tolist() == s[:3].tolist()
    assert list(node.children) == [4]
    child = node.children[4]
    assert child.key.tolist() == [4, 5] and child.value.tolist() == s[3:].tolist()
    assert child.parent is node and node.parent is c.root
    assert c.total_size() == 5

    # Whole sequence still matches across the split.
    got, _ = c.match_prefix([1, 2, 3, 4, 5])
    np.testing.assert_array_equal(got, s)
    # Returned slots are a copy: mutating them does not corrupt the tree.
    got[:] = 0
    got2, _ = c.match_prefix([1, 2, 3, 4, 5])
    np.testing.assert_array_equal(got2, s)
    check_invariants(c, a)


def test_insert_returns_existing_prefix_len() -> None:
    a, c = make()
    s1 = a.alloc(4)
    assert c.insert([1, 2, 3, 4], s1) == 0
    s2 = a.alloc(6)
    assert c.insert([1, 2, 3, 9, 9, 9], s2) == 3
    a.free(s2[:3])  # caller frees its duplicates
    got, _ = c.match_prefix([1, 2, 3, 9, 9, 9])
    np.testing.assert_array_equal(got, np.concatenate([s1[:3], s2[3:]]))
    s3 = a.alloc(2)
    assert c.insert([1, 2], s3) == 2  # fully cached already
    a.free(s3)
    s4 = a.alloc(4)
    assert c.insert([1, 2, 3, 4], s4) == 4
    a.free(s4)
    assert c.total_size() == 7
    check_invariants(c, a)
    # Mismatched lengths are rejected.
    with pytest.raises(ValueError):
        c.insert([1, 2, 3], arr(1, 2))


def test_insert_copies_slots() -> None:
    a, c = make()
    s = a.alloc(3)
    c.insert([5, 6, 7], s)
    keep = s.copy()
    s[:] = 0  # caller reuses its buffer
    got, _ = c.match_prefix([5, 6, 7])
    np.testing.assert_array_equal(got, keep)


def test_lru_eviction_order() -> None:
    a, c = make()
    old = insert_new(c, a, [1, 1, 1])
    new = insert_new(c, a, [2, 2, 2])
    c.match_prefix([1, 1, 1])  # touch the first: now [2,2,2] is LRU
    assert c.evict(1) == 3
    assert not a.is_allocated(new).any()
    got, _ = c.match_prefix([2, 2, 2])
    assert len(got) == 0
    got, _ = c.match_prefix([1, 1, 1])
    np.testing.assert_array_equal(got, old)
    check_invariants(c, a)


def test_parent_evicted_after_children() -> None:
    a, c = make()
    insert_new(c, a, [1, 2, 3, 4])  # leaf A
    insert_new(c, a, [1, 2, 5, 6])  # splits: parent [1,2], leaves [3,4] and [5,6]
    insert_new(c, a, [9])  # newest, separate branch
    # Make the branch [1,2,*] older than [9]: touch [9] last.
    c.match_prefix([9])
    assert c.total_size() == 7
    freed = c.evict(2)  # evicts one oldest leaf (2 slots)
    assert freed == 2
    # The shared parent [1,2] is still there because a child remains.
    got, _ = c.match_prefix([1, 2])
    assert len(got) == 2
    c.match_prefix([9])  # keep [9] newest
    # Now evict 4 more: remaining child (2), then parent [1,2] (2) which became a leaf.
    freed = c.evict(4)
    assert freed == 4
    assert c.total_size() == 1
    got, _ = c.match_prefix([9])
    assert len(got) == 1
    assert c.evict(100) == 1  # returns what it actually freed
    assert c.total_size() == 0 and a.num_free == a.num_slots
    assert c.evict(5) == 0
    check_invariants(c, a)


def test_split_does_not_refresh_unmatched_tail() -> None:
    a, c = make()
    insert_new(c, a, [1, 2, 3, 4])  # oldest
    insert_new(c, a, [5, 5])
    c.match_prefix([1, 2])  # touches only [1,2]; the [3,4] tail stays old
    assert c.evict(1) == 2
    assert len(c.match_prefix([5, 5])[0]) == 2
    assert len(c.match_prefix([1, 2, 3, 4])[0]) == 2


def test_insert_refreshes_shared_prefix() -> None:
    a, c = make()
    insert_new(c, a, [1, 2, 3, 4])  # t1
    insert_new(c, a, [9])
    _, n9 = c.match_prefix([9])  # t3
    c.inc_ref(n9)  # keep [9] out of the first eviction
    insert_new(c, a, [1, 2, 5])  # t4: splits, [1,2] is now as fresh as [5]
    assert c.evict(3) == 3  # [3,4] then [5]; [1,2] is now a leaf
    c.dec_ref(n9)
    assert c.evict(1) == 1  # [9] is older than the refreshed [1,2]
    assert len(c.match_prefix([1, 2])[0]) == 2
    assert len(c.match_prefix([9])[0]) == 0


def test_evict_frees_whole_leaf_and_returns_count() -> None:
    a, c = make()
    insert_new(c, a, [1, 2, 3, 4, 5])
    assert c.evict(1) == 5  # page-granular: whole node goes
    assert a.num_free == a.num_slots


def test_locked_paths_never_evicted_and_sizes() -> None:
    a, c = make()
    s = insert_new(c, a, [1, 2, 3, 4])
    insert_new(c, a, [7, 8])
    slots, node = c.match_prefix([1, 2, 3])  # splits [1,2,3] | [4]
    c.inc_ref(node)
    assert c.protected_size == 3 and c.evictable_size == 3
    check_invariants(c, a)
    # Only [4] and [7,8] are evictable.
    assert c.evict(100) == 3
    got, _ = c.match_prefix([1, 2, 3, 4])
    np.testing.assert_array_equal(got, s[:3])
    assert c.total_size() == 3 and c.evictable_size == 0
    assert c.evict(100) == 0
    # Double lock / unlock nesting.
    c.inc_ref(node)
    c.dec_ref(node)
    assert c.protected_size == 3
    c.dec_ref(node)
    assert c.protected_size == 0 and c.evictable_size == 3
    with pytest.raises(RuntimeError):
        c.dec_ref(node)
    assert c.evict(3) == 3
    assert a.num_free == a.num_slots
    check_invariants(c, a)


def test_lock_survives_split_of_locked_node() -> None:
    a, c = make()
    insert_new(c, a, [1, 2, 3, 4])
    _, node = c.match_prefix([1, 2, 3, 4])
    c.inc_ref(node)
    # Inserting a divergent sequence splits the locked node.
    insert_new(c, a, [1, 2, 9])
    assert c.protected_size == 4 and c.evictable_size == 1
    check_invariants(c, a)
    assert c.evict(100) == 1
    c.dec_ref(node)  # releases both halves of the split
    assert c.protected_size == 0 and c.evictable_size == 4
    assert c.evict(100) == 4
    check_invariants(c, a)


def test_reset() -> None:
    a, c = make()
    insert_new(c, a, [1, 2, 3])
    insert_new(c, a, [1, 5])
    _, node = c.match_prefix([1, 2])
    c.inc_ref(node)
    with pytest.raises(RuntimeError):
        c.reset()
    c.dec_ref(node)
    c.reset()
    assert c.total_size() == 0 and a.num_free == a.num_slots
    assert len(c.match_prefix([1, 2, 3])[0]) == 0


# ---------------------------------------------------------------- cache_request
def test_cache_request_finished() -> None:
    a, c = make(32)
    # First request: nothing cached; finishes with 5 tokens.
    t1 = [1, 2, 3, 4, 5]
    pre, node = c.match_prefix(t1)
    c.inc_ref(node)
    s1 = a.alloc(5)
    r = c.cache_request(t1, s1, len(pre), node, finished=True)
    assert isinstance(r, CacheResult)
    assert r.prefix_len == 0 and r.last_node is c.root and len(r.prefix_slots) == 0
    assert r.num_cached == 0
    assert c.total_size() == 5 and c.protected_size == 0
    assert a.num_free == 32 - 5

    # Second request shares [1,2,3], uses the tree's slots for it.
    t2 = [1, 2, 3, 8, 9]
    pre, node = c.match_prefix(t2)
    assert len(pre) == 3
    c.inc_ref(node)
    s2 = np.concatenate([pre, a.alloc(2)])
    r = c.cache_request(t2, s2, len(pre), node, finished=True)
    assert r.num_cached == 3
    assert c.total_size() == 7 and c.protected_size == 0
    assert a.num_free == 32 - 7
    check_invariants(c, a)

    # A request that computed tokens also cached meanwhile by someone else:
    # prefix_len=0 but 5 tokens are already there -> its 5 duplicates are freed.
    s3 = a.alloc(6)
    r = c.cache_request([1, 2, 3, 4, 5, 6], s3, 0, c.root, finished=True)
    assert r.num_cached == 5
    assert not a.is_allocated(s3[:5]).any() and a.is_allocated(s3[5:]).all()
    assert c.total_size() == 8
    check_invariants(c, a)


def test_cache_request_unfinished_then_finished() -> None:
    a, c = make(32)
    insert_new(c, a, [1, 2, 3, 4, 5, 6])
    # Chunked prefill: the request sees the cached prefix [1,2,3].
    toks = [1, 2, 3, 7, 7]
    pre, node = c.match_prefix(toks)
    assert len(pre) == 3
    c.inc_ref(node)
    own = a.alloc(2)
    slots = np.concatenate([pre, own])
    r = c.cache_request(toks, slots, 3, node, finished=False)
    assert r.prefix_len == 5 and r.num_cached == 3
    np.testing.assert_array_equal(r.prefix_slots, slots)  # no dup: tree took our slots
    assert r.last_node.key.tolist() == [7, 7]
    assert c.protected_size == 5  # [1,2,3] + [7,7] locked for the request
    check_invariants(c, a)
    assert c.evict(100) == 3  # only the unlocked [4,5,6] can go
    check_invariants(c, a)

    # Meanwhile another request cached a longer continuation with other slots.
    other = insert_new(c, a, [1, 2, 3, 7, 7, 7, 7])
    # Our request now decoded two more tokens with its own slots; the tree
    # already holds [7, 7] at those positions -> ours are duplicates.
    toks2 = toks + [7, 7]
    more = a.alloc(2)
    slots2 = np.concatenate([r.prefix_slots, more])
    r2 = c.cache_request(toks2, slots2, r.prefix_len, r.last_node, finished=False)
    assert r2.prefix_len == 7 and r2.num_cached == 7
    assert not a.is_allocated(more).any()  # duplicates freed
    np.testing.assert_array_equal(r2.prefix_slots[5:], other[5:])
    assert c.protected_size == 7
    check_invariants(c, a)

    toks3 = toks2 + [1]
    last = a.alloc(1)
    r3 = c.cache_request(toks3, np.concatenate([r2.prefix_slots, last]), r2.prefix_len, r2.last_node, finished=True)
    assert r3.prefix_len == 0 and r3.last_node is c.root
    assert c.protected_size == 0 and c.total_size() == 8
    check_invariants(c, a)
    c.evict(100)
    assert a.num_free == a.num_slots


# ----------------------------------------------------------------- disabled
def test_disabled_cache() -> None:
    a, c = make(16, enabled=False)
    s = a.alloc(4)
    assert c.insert([1, 2, 3, 4], s) == 0
    assert c.total_size() == 0
    pre, node = c.match_prefix([1, 2, 3, 4])
    assert len(pre) == 0 and node is c.root
    c.inc_ref(node)  # no-op on root
    r = c.cache_request([1, 2, 3, 4], s, 0, node, finished=False)
    assert r.prefix_len == 0 and a.num_free == 12  # request keeps its slots
    r = c.cache_request([1, 2, 3, 4, 5], np.concatenate([s, a.alloc(1)]), 0, c.root, finished=True)
    assert r.prefix_len == 0 and a.num_free == 16
    assert c.evict(10) == 0


# ------------------------------------------------------------ property test
@pytest.mark.parametrize("seed", range(8))
def test_randomized(seed: int) -> None:
    rng = random.Random(seed)
    num_slots = 60
    a = SlotAllocator(num_slots)
    c = RadixCache(a)
    # Oracle: slot assigned to each prefix by its most recent insertion.
    model: dict[tuple[int, ...], int] = {}
    # Live requests: (tokens, tree-owned prefix slots, node, private slots).
    live: list[tuple[list[int], np.ndarray, TreeNode, np.ndarray]] = []

    def held() -> int:
        return sum(len(r[3]) for r in live)

    def record(tokens: list[int], slots: np.ndarray, start: int) -> None:
        for i in range(start, len(tokens)):
            model[tuple(tokens[: i + 1])] = int(slots[i])

    def check_match(tokens: list[int], got: np.ndarray) -> None:
        contents = tree_contents(c)
        k = len(got)
        assert k == len(tokens) or tuple(tokens[: k + 1]) not in contents, "not longest"
        for i in range(k):
            p = tuple(tokens[: i + 1])
            assert contents[p] == int(got[i]) == model[p]

    for _ in range(250):
        op = rng.random()
        toks = [rng.randrange(3) for _ in range(rng.randrange(0, 10))]
        if op < 0.35:
            # New request: match, lock, allocate the rest (evicting if needed).
            pre, node = c.match_prefix(toks)
            check_match(toks, pre)
            c.inc_ref(node)
            need = len(toks) - len(pre)
            own = a.alloc(need)
            if own is None:
                c.evict(need - a.num_free)
                own = a.alloc(need)
            if own is None:
                c.dec_ref(node)
            else:
                live.append((toks, pre, node, own))
        elif op < 0.55 and live:
            # Finish or continue a live request via cache_request.
            i = rng.randrange(len(live))
            t, pre, node, own = live.pop(i)
            slots = np.concatenate([pre, own])
            before = c.total_size()
            finished = rng.random() < 0.6
            r = c.cache_request(t, slots, len(pre), node, finished)
            record(t, slots, r.num_cached)
            assert c.total_size() == before + len(t) - r.num_cached
            if not finished:
                assert r.prefix_len == len(t)
                check_match(t, r.prefix_slots)
                live.append((t, r.prefix_slots, r.last_node, own[:0]))
        elif op < 0.70:
            # Plain insert with fresh slots.
            s = a.alloc(len(toks))
            if s is not None:
                n = c.insert(toks, s)
                a.free(s[:n])
                record(toks, s, n)
        elif op < 0.85:
            got, _ = c.match_prefix(toks)
            check_match(toks, got)
        else:
            c.evict(rng.randrange(1, 20))
        check_invariants(c, a, held())
        # Locked prefixes are never evicted and keep their slots.
        contents = tree_contents(c)
        for t, pre, _, _ in live:
            for j in range(len(pre)):
                assert contents[tuple(t[: j + 1])] == int(pre[j])

    # Unlock everything, release private slots, evict all.
    for _t, _pre, node, own in live:
        c.dec_ref(node)
        a.free(own)
    live.clear()
    assert c.protected_size == 0
    check_invariants(c, a)
    assert a.num_free + c.total_size() == num_slots
    c.evict(num_slots + 1)
    assert c.total_size() == 0 and a.num_free == num_slots
    assert not c.root.children
