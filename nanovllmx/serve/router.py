"""Prefix-cache-aware request routing across `LLMServer` replicas (docs/serving.md, "Routing across
replicas").

Each replica publishes, through Serve's routing stats (`LLMServer.record_routing_stats`), a compact
summary of its engine's radix tree: the newest chained hashes of its prefix blocks of 64 tokens
(`RadixCache.block_hashes`), plus its load. `PrefixCacheRouter` (a Serve `RequestRouter`, run where
the `LLMServer` handle is: in the `LLMIngress` replica) hashes the request's token ids the same way
and sends it to the replica that holds the longest prefix, weighed against load; with no useful
prefix anywhere it falls back to power of two choices. `rank_replicas` is the whole decision, free of
Ray so that it can be tested with fake replicas.
"""

from __future__ import annotations

import random
import time
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from nanovllmx.scheduler.radix_cache import BLOCK_SIZE, block_hashes

# What a replica publishes at most: 4096 hashes (32 KB) name 262k tokens of cached prefixes.
SUMMARY_LIMIT = 4096
# build_app's request_routing_stats_period_s: how stale a summary may be (the router also remembers
# where it sent each prefix itself, so a conversation's next turn does not wait for it)
SUMMARY_PERIOD_S = 0.5
# one request in a replica's queue weighs as much as this many tokens of cached prefix
DEFAULT_TOKENS_PER_REQUEST = 128
DEFAULT_RECENT_TTL_S = 10.0
_RNG = random.Random()


@dataclass
class ReplicaView:
    """What the choice needs of one replica."""

    replica_id: Hashable
    hashes: Collection[int]  # its prefix block hashes (summary + what this router sent it lately)
    load: float  # requests it is serving or queueing
    free_slots: int | None = None  # KV token slots it could still give (free + evictable), if known


def matched_blocks(request_hashes: Sequence[int], hashes: Collection[int]) -> int:
    """How many leading blocks of the request a replica holds (the chain makes block k's hash name
    the whole prefix up to it, so the match stops at the first block it lacks)."""
    n = 0
    for h in request_hashes:
        if h not in hashes:
            break
        n += 1
    return n


def rank_replicas(
    request_hashes: Sequence[int],
    num_prompt_tokens: int,
    replicas: Sequence[ReplicaView],
    *,
    block_size: int = BLOCK_SIZE,
    tokens_per_request: int = DEFAULT_TOKENS_PER_REQUEST,
    rng: random.Random | None = None,
) -> list[list[Hashable]]:
    """Replica ids in ranks, best first (Serve's `choose_replicas` contract: it takes the least loaded
    replica of the first rank that has room, then tries the next rank).

    score = cached prefix tokens - tokens_per_request * (load - the least load), where load counts a
    replica's requests plus, when it lacks free KV slots for the uncached rest of this prompt, one
    request per tokens_per_request missing slots. So the longest prefix wins between equally loaded
    replicas, the lower load breaks ties, and a short prefix loses to a replica that is several
    requests less busy. With no replica holding one block of the prompt: two random replicas (power
    of two choices, as Serve's default router)."""
    rng = rng or _RNG
    if not replicas:
        return []
    matches = [matched_blocks(request_hashes, r.hashes) for r in replicas]
    if max(matches) == 0:
        if len(replicas) <= 2:
            ids = [r.replica_id for r in replicas]
            rng.shuffle(ids)
            return [ids]
        return [[r.replica_id for r in rng.sample(list(replicas), 2)]]

    def load(r: ReplicaView, m: int) -> float:
        extra = 0.0
        if r.free_slots is not None:
            missing = (num_prompt_tokens - m * block_size) - r.free_slots
            extra = max(0, missing) / tokens_per_request
        return r.load + extra

    loads = [load(r, m) for r, m in zip(replicas, matches, strict=True)]
    least = min(loads)
    scored = [
        (m * block_size - tokens_per_request * (ld - least), -ld, rng.random(), r.replica_id)
        for r, m, ld in zip(replicas, matches, loads, strict=True)
    ]
    scored.sort(reverse=True)
    ranks: list[list[Hashable]] = [[scored[0][3]]]
    if len(scored) > 1:
        ranks.append([s[3] for s in scored[1:]])
    return ranks


def decode_summary(raw: Any) -> frozenset[int]:
    """The hashes of a replica's routing stats (`prefix_hashes`: little-endian uint64 bytes)."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) % 8:
        return frozenset()
    return frozenset(np.frombuffer(raw, dtype="<u8").tolist())


def encode_summary(hashes: Sequence[int]) -> bytes:
    return np.asarray(hashes, dtype="<u8").tobytes()


def prompt_ids_of(pending: PendingRequest | None) -> list[int] | None:
    """The token ids `LLMIngress` passes to `LLMServer.generate_ids` (keyword `prompt_ids`)."""
    if pending is None:
        return None
    ids = pending.kwargs.get("prompt_ids")
    return ids if isinstance(ids, list) else None


class PrefixCacheRouter(RequestRouter):
    """Serve request router for `LLMServer`: longest cached prefix, weighed against load
    (`rank_replicas`); power of two choices for requests without token ids (health, models, ...) or
    without a useful prefix anywhere."""

    def initialize_state(
        self,
        tokens_per_request: int = DEFAULT_TOKENS_PER_REQUEST,
        recent_ttl_s: float = DEFAULT_RECENT_TTL_S,
        **kwargs: Any,
    ) -> None:
        self.tokens_per_request = int(tokens_per_request)
        self.recent_ttl_s = float(recent_ttl_s)
        self._rng = random.Random()
        # replica -> (the summary bytes last decoded, its hashes)
        self._summaries: dict[ReplicaID, tuple[bytes, frozenset[int]]] = {}
        # replica -> {hash: when this router sent a request with that prefix block there}
        self._recent: dict[ReplicaID, dict[int, float]] = {}
        self._hashes: dict[str, list[int]] = {}  # internal request id -> its prompt's block hashes

    # ------------------------------------------------------------------ state
    def _summary(self, r: RunningReplica) -> frozenset[int]:
        raw = (r.routing_stats or {}).get("prefix_hashes", b"")
        cached = self._summaries.get(r.replica_id)
        if cached is not None and cached[0] is raw:
            return cached[1]
        hashes = decode_summary(raw)
        self._summaries[r.replica_id] = (raw, hashes)
        return hashes

    def _recent_of(self, replica_id: ReplicaID, now: float) -> dict[int, float]:
        recent = self._recent.setdefault(replica_id, {})
        if recent:
            oldest = next(iter(recent.values()))
            if now - oldest > self.recent_ttl_s:
                for h in [h for h, t in recent.items() if now - t > self.recent_ttl_s]:
                    del recent[h]
        return recent

    def _request_hashes(self, pending: PendingRequest | None) -> tuple[list[int], int]:
        ids = prompt_ids_of(pending)
        if pending is None or ids is None:
            return [], 0
        key = pending.metadata.internal_request_id
        hashes = self._hashes.get(key)
        if hashes is None:
            hashes = self._hashes[key] = block_hashes(ids)
        return hashes, len(ids)

    def _view(self, r: RunningReplica, now: float) -> ReplicaView:
        stats = r.routing_stats or {}
        summary = self._summary(r)
        recent = self._recent_of(r.replica_id, now)
        hashes: Collection[int] = summary if not recent else _Union(summary, recent)
        queued = self._replica_queue_len_cache.get(r.replica_id)
        if queued is None:
            queued = int(stats.get("num_running", 0)) + int(stats.get("num_waiting", 0))
        free = stats.get("free_slots")
        return ReplicaView(r.replica_id, hashes, float(queued), int(free) if free is not None else None)

    # ------------------------------------------------------------------ Serve's hooks
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        hashes, n_tokens = self._request_hashes(pending_request)
        now = time.monotonic()
        views = [self._view(r, now) for r in candidate_replicas]
        by_id = {r.replica_id: r for r in candidate_replicas}
        ranks = rank_replicas(hashes, n_tokens, views, tokens_per_request=self.tokens_per_request, rng=self._rng)
        return [[by_id[i] for i in rank] for rank in ranks]  # type: ignore[index]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        hashes = self._hashes.pop(pending_request.metadata.internal_request_id, None)
        if hashes:
            now = time.monotonic()
            recent = self._recent.setdefault(replica_id, {})
            for h in hashes:
                recent.pop(h, None)  # re-insert: the dict stays oldest first
                recent[h] = now

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._recent.pop(replica_id, None)
        self._summaries.pop(replica_id, None)


class _Union(Collection[int]):
    """`a | b` for membership tests, without copying either."""

    def __init__(self, a: Collection[int], b: Collection[int]):
        self.a, self.b = a, b

    def __contains__(self, h: object) -> bool:
        return h in self.a or h in self.b

    def __len__(self) -> int:
        return len(self.a) + len(self.b)

    def __iter__(self) -> Any:
        yield from self.a
        yield from self.b
