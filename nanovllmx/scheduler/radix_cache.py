"""SGLang-style radix-tree prefix cache over a token-slot KV pool (page size 1).

Each edge (node) holds a run of token ids (`key`) and the KV slots those tokens
live in (`value`, same length): token i of a cached sequence is in slot value[i].
The tree owns the slots of every node; a request that matched a prefix borrows
them while it holds a ref (lock) on the node where its match ends.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from nanovllmx.scheduler.allocator import SlotAllocator

_EMPTY = np.zeros(0, dtype=np.int32)
_node_ids = itertools.count()
# Prefix summaries (what a replica publishes for the request router, serve/router.py): every full
# block of BLOCK_SIZE tokens from the start of a cached sequence, hashed chained (a block's hash
# covers all tokens before it), so one hash names one prefix. Same in every process (blake2b, not
# Python's salted hash()).
BLOCK_SIZE = 64


def block_hashes(tokens: Sequence[int] | np.ndarray, block_size: int = BLOCK_SIZE, start: int = 0) -> list[int]:
    """Chained 64-bit hashes of the full blocks of `tokens`, from block `start` on (the chain is
    always computed from the first token)."""
    key = _as_tokens(tokens)
    out: list[int] = []
    prev = b""
    for k in range(len(key) // block_size):
        prev = hashlib.blake2b(prev + key[k * block_size : (k + 1) * block_size].tobytes(), digest_size=8).digest()
        if k >= start:
            out.append(int.from_bytes(prev, "little"))
    return out


@dataclass(slots=True, eq=False)  # eq=False: nodes hash/compare by identity
class TreeNode:
    key: np.ndarray  # int32 token ids of this edge
    value: np.ndarray  # int32 KV slots, len(value) == len(key)
    parent: TreeNode | None = None
    children: dict[int, TreeNode] = field(default_factory=dict)  # first token -> child
    lock_ref: int = 0  # number of holders of a path through this node
    last_access: int = 0  # logical clock tick of the last match/insert through it
    id: int = field(default_factory=lambda: next(_node_ids))  # heap tie-breaker
    # (end depth, hash) of the prefix blocks whose last token is on this edge (block_hashes)
    blocks: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.key)

    @property
    def is_leaf(self) -> bool:
        return not self.children


@dataclass(slots=True)
class CacheResult:
    """What a request holds after `RadixCache.cache_request`.

    prefix_len / last_node / prefix_slots describe the tree-owned prefix the
    request now holds a ref on (0 / root / empty when finished or disabled); the
    caller must use `prefix_slots` for tokens[:prefix_len] from now on, since its
    own duplicates were freed. `num_cached` is how many leading tokens were
    already in the tree before this insert (handy for stats).
    """

    prefix_len: int
    last_node: TreeNode
    prefix_slots: np.ndarray
    num_cached: int


def _as_tokens(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int32).ravel()


def _common_prefix_len(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two int32 arrays, vectorised."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    neq = a[:n] != b[:n]
    i = int(neq.argmax())  # first mismatch, or 0 if none
    return i if neq[i] else n


class RadixCache:
    def __init__(self, allocator: SlotAllocator, enabled: bool = True) -> None:
        self.allocator = allocator
        self.enabled = enabled
        self._clock = 0
        self.root = self._new_root()
        self._evictable = 0
        self._protected = 0
        # every prefix block hash in the tree, oldest insert first (a dict as an ordered set)
        self.block_hash_set: dict[int, None] = {}

    @staticmethod
    def _new_root() -> TreeNode:
        # Root is permanently "locked" so it is never treated as evictable.
        return TreeNode(key=_EMPTY, value=_EMPTY, lock_ref=1)

    def _tick(self) -> int:
        # Logical clock rather than wall time: deterministic LRU and no ties
        # between consecutive operations.
        self._clock += 1
        return self._clock

    # ------------------------------------------------------------------ sizes
    @property
    def evictable_size(self) -> int:
        return self._evictable

    @property
    def protected_size(self) -> int:
        return self._protected

    def total_size(self) -> int:
        return self._evictable + self._protected

    # ------------------------------------------------------------------ match
    def match_prefix(self, tokens: Sequence[int] | np.ndarray) -> tuple[np.ndarray, TreeNode]:
        """Slots of the longest cached prefix of `tokens` and the node where it
        ends (split so that it covers exactly that prefix). Returns a copy."""
        key = _as_tokens(tokens)
        if not self.enabled or len(key) == 0:
            return _EMPTY.copy(), self.root
        node, _, values = self._walk(key)
        if not values:
            return _EMPTY.copy(), node
        return np.concatenate(values), node

    def _walk(self, key: np.ndarray) -> tuple[TreeNode, int, list[np.ndarray]]:
        """Follow `key` down the tree as far as it matches, splitting the edge where the match
        ends inside one (so the returned node covers exactly key[:pos]) and stamping the path.
        Returns (that node, pos, the matched edges' slot arrays)."""
        now = self._tick()
        node = self.root
        node.last_access = now
        values: list[np.ndarray] = []
        pos = 0
        while pos < len(key):
            child = node.children.get(int(key[pos]))
            if child is None:
                break
            m = _common_prefix_len(child.key, key[pos:])
            partial = m < len(child.key)
            if partial:
                child = self._split(child, m, pos)
            # Stamp after a split: the unmatched lower half was not accessed.
            child.last_access = now
            values.append(child.value)
            node = child
            pos += m
            if partial:
                break
        return node, pos, values

    def _split(self, child: TreeNode, m: int, start: int) -> TreeNode:
        """Split `child` (whose first token is at depth `start`) after m tokens (0 < m < len);
        returns the new upper node."""
        parent = child.parent
        assert parent is not None and 0 < m < len(child.key)
        # The upper part inherits lock_ref: every locked path through child
        # also passes through it, so protected/evictable sizes are unchanged.
        upper = TreeNode(
            key=child.key[:m],
            value=child.value[:m],
            parent=parent,
            lock_ref=child.lock_ref,
            last_access=child.last_access,
        )
        if child.blocks:  # blocks ending in the upper half move up with it
            upper.blocks = [b for b in child.blocks if b[0] <= start + m]
            child.blocks = [b for b in child.blocks if b[0] > start + m]
        child.key = child.key[m:]
        child.value = child.value[m:]
        child.parent = upper
        upper.children[int(child.key[0])] = child
        parent.children[int(upper.key[0])] = upper
        return upper

    # ------------------------------------------------------------------ locks
    def inc_ref(self, node: TreeNode) -> None:
        """Lock the path root..node against eviction."""
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def dec_ref(self, node: TreeNode) -> None:
        """Undo one inc_ref(node)."""
        while node is not self.root:
            if node.lock_ref <= 0:
                raise RuntimeError("dec_ref on a node that is not locked")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected -= len(node.key)
                self._evictable += len(node.key)
            node = node.parent  # type: ignore[assignment]

    # ----------------------------------------------------------------- insert
    def insert(self, tokens: Sequence[int] | np.ndarray, slots: np.ndarray | Sequence[int]) -> int:
        """Insert tokens -> slots. Returns how many leading tokens were already
        cached: the tree keeps its own slots for those (the caller frees its
        duplicates) and takes ownership of slots[returned:]."""
        if not self.enabled:
            return 0
        key = _as_tokens(tokens)
        value = np.asarray(slots, dtype=np.int32).ravel()
        if len(value) != len(key):
            raise ValueError(f"len(slots)={len(value)} != len(tokens)={len(key)}")
        node, pos, _ = self._walk(key)
        n = len(key)
        now = node.last_access
        if pos < n:
            # Copy so later writes to the caller's arrays cannot corrupt the tree.
            leaf = TreeNode(key=key[pos:].copy(), value=value[pos:].copy(), parent=node, last_access=now)
            node.children[int(key[pos])] = leaf
            self._evictable += n - pos
            first = pos // BLOCK_SIZE  # the first block that ends on the new edge (after depth pos)
            if n // BLOCK_SIZE > first:
                hashes = block_hashes(key, BLOCK_SIZE, first)
                leaf.blocks = [((first + i + 1) * BLOCK_SIZE, h) for i, h in enumerate(hashes)]
                self.block_hash_set.update(dict.fromkeys(hashes))
        return pos

    # ------------------------------------------------------------------ evict
    def _evictable_leaves(self) -> list[tuple[int, int, TreeNode]]:
        out: list[tuple[int, int, TreeNode]] = []
        stack = [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node.lock_ref == 0:
                out.append((node.last_access, node.id, node))
        return out

    def evict(self, num_slots: int) -> int:
        """Free LRU unlocked leaves (cascading to parents that become leaves)
        until >= num_slots slots are freed or nothing is evictable."""
        if num_slots <= 0 or self._evictable == 0:
            return 0
        heap = self._evictable_leaves()
        heapq.heapify(heap)
        freed: list[np.ndarray] = []
        num_freed = 0
        while num_freed < num_slots and heap:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None and node.lock_ref == 0 and not node.children
            del parent.children[int(node.key[0])]
            node.parent = None
            freed.append(node.value)
            for _, h in node.blocks:
                self.block_hash_set.pop(h, None)
            num_freed += len(node.value)
            self._evictable -= len(node.value)
            if not parent.children and parent.lock_ref == 0:  # root has lock_ref 1
                heapq.heappush(heap, (parent.last_access, parent.id, parent))
        if freed:
            # One vectorised free for the whole batch.
            self.allocator.free(np.concatenate(freed))
        return num_freed

    def reset(self) -> None:
        """Drop the whole tree, freeing its slots. Only valid when nothing is locked."""
        if self._protected:
            raise RuntimeError("reset() while some nodes are locked")
        slots = self.all_slots()
        if len(slots):
            self.allocator.free(slots)
        self.root = self._new_root()
        self._evictable = 0
        self._protected = 0
        self.block_hash_set = {}

    def prefix_summary(self, limit: int) -> list[int]:
        """The newest `limit` prefix block hashes (block_hashes) of the tree: the replica's summary
        for the request router. list(): one C-level copy, safe while the engine thread inserts."""
        keys = list(self.block_hash_set)
        return keys[-limit:] if limit < len(keys) else keys

    def all_slots(self) -> np.ndarray:
        """Every slot owned by the tree (O(tree); for reset / checks / tests)."""
        vals: list[np.ndarray] = []
        stack = [self.root]
        while stack:
            node = stack.pop()
            vals.append(node.value)
            stack.extend(node.children.values())
        return np.concatenate(vals) if vals else _EMPTY.copy()

    # ------------------------------------------------------ request lifecycle
    def cache_request(
        self,
        tokens: Sequence[int] | np.ndarray,
        slots: np.ndarray,
        prefix_len: int,
        last_node: TreeNode,
        finished: bool,
    ) -> CacheResult:
        """Hand a request's KV to the tree (SGLang cache_finished_req /
        cache_unfinished_req).

        tokens/slots: the request's full sequence so far (same length);
        slots[:prefix_len] came from the tree and are locked via last_node.
        Frees the request's duplicates of already-cached slots and releases
        last_node. If not finished, re-locks the (now fully cached) sequence and
        returns the tree's slots to use for it; if finished, holds nothing.
        """
        slots = np.asarray(slots, dtype=np.int32).ravel()
        if not self.enabled:
            if finished:
                self.allocator.free(slots[prefix_len:])
            # Unfinished: the request keeps owning all its slots.
            self.dec_ref(last_node)
            return CacheResult(0, self.root, _EMPTY.copy(), 0)

        num_cached = self.insert(tokens, slots)
        if num_cached < prefix_len:
            raise RuntimeError("locked prefix missing from the tree")
        # The tree kept its own slots for [prefix_len, num_cached): ours are duplicates.
        if num_cached > prefix_len:
            self.allocator.free(slots[prefix_len:num_cached])

        if finished:
            self.dec_ref(last_node)
            return CacheResult(0, self.root, _EMPTY.copy(), num_cached)

        new_slots, new_node = self.match_prefix(tokens)
        assert len(new_slots) == len(slots)
        # Lock the new path before releasing the old one (no window for eviction).
        self.inc_ref(new_node)
        self.dec_ref(last_node)
        return CacheResult(len(new_slots), new_node, new_slots, num_cached)
