"""Observability: Prometheus metrics through `ray.util.metrics`, and the periodic engine stats line.

Everything here is recorded only when Ray is initialized (a Serve replica always is); the offline
`LLM` without Ray records nothing. Where the numbers come from:

- engine gauges and token counters: `llm.stats()` polled once a second by `EngineStatsMonitor` (a
  daemon thread in the Serve replica; a Ray call per second for a distributed engine, never one per
  token). Counters advance by the difference between two polls;
- per-request latencies (TTFT, inter-token latency, end-to-end, queue time) and outcomes: the Serve
  app's `EngineStream`, where each delta arrives (one histogram observe per delta, ~3 us);
- HTTP status counts: `nanovllmx.serve.middleware.HTTPStatusMiddleware`, an ASGI middleware of the app.

Ray exports each metric as `ray_<name>` (counters also get `_total`) on every node's metrics
export port, which Prometheus scrapes; docs/observability.md lists them all.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("nanovllmx.stats")

# Histogram boundaries (seconds). Fine at the low end: a GPU decode step is a few milliseconds.
TTFT_BUCKETS = [
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
]
ITL_BUCKETS = [
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
]
E2E_BUCKETS = [
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
]
QUEUE_BUCKETS = [
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    320.0,
    640.0,
]

FINISH_REASONS = ("stop", "length", "abort", "error")


def ray_initialized() -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return ray.is_initialized()


class ServeMetrics:
    """The metrics of one replica (one engine), every one tagged with `model_name`.

    Build it with `ServeMetrics.create(name)`, which returns None when Ray is not initialized:
    callers then simply skip recording.
    """

    def __init__(self, model_name: str):
        from ray.util.metrics import Counter, Gauge, Histogram

        self.model_name = model_name
        tags = {"model_name": model_name}

        def mk(cls: Any, name: str, desc: str, keys: tuple[str, ...] = (), **kw: Any) -> Any:
            m = cls(name, desc, tag_keys=("model_name",) + keys, **kw)
            m.set_default_tags(tags)
            return m

        # ---- engine state (set from llm.stats() once a second)
        self.running = mk(Gauge, "nanovllmx_num_requests_running", "Requests in the running batch.")
        self.waiting = mk(
            Gauge, "nanovllmx_num_requests_waiting", "Requests waiting to be scheduled (preempted ones included)."
        )
        self.preempted = mk(
            Gauge,
            "nanovllmx_num_requests_preempted",
            "Waiting requests that were preempted (their KV went to the radix cache) and will be recomputed.",
        )
        self.preemptions = mk(
            Counter, "nanovllmx_preemptions", "Preemptions (a running request sent back to the queue)."
        )
        self.kv_usage = mk(
            Gauge, "nanovllmx_kv_cache_usage", "Fraction of KV slots held by requests (running, or prefixes they lock)."
        )
        self.kv_cached = mk(
            Gauge,
            "nanovllmx_kv_cache_cached_usage",
            "Fraction of KV slots held only by the radix prefix cache (evictable).",
        )
        self.kv_slots = mk(Gauge, "nanovllmx_kv_cache_slots", "KV cache size in token slots.")
        self.hit_rate = mk(
            Gauge, "nanovllmx_prefix_cache_hit_rate", "Cached prompt tokens / prompt tokens since the engine started."
        )
        self.prompt_tokens = mk(Counter, "nanovllmx_prompt_tokens", "Prompt tokens of admitted requests.")
        self.cached_tokens = mk(
            Counter,
            "nanovllmx_cached_prompt_tokens",
            "Prompt tokens whose KV came from the radix prefix cache (prefix-cache hits).",
        )
        self.generation_tokens = mk(Counter, "nanovllmx_generation_tokens", "Generated (sampled) tokens.")
        # ---- per request (where the deltas arrive)
        self.ttft = mk(
            Histogram,
            "nanovllmx_time_to_first_token_seconds",
            "From submission to the engine to the first token.",
            boundaries=TTFT_BUCKETS,
        )
        self.itl = mk(
            Histogram,
            "nanovllmx_inter_token_latency_seconds",
            "Between two consecutive token deltas of a request.",
            boundaries=ITL_BUCKETS,
        )
        self.e2e = mk(
            Histogram,
            "nanovllmx_e2e_request_latency_seconds",
            "From submission to the last token, of requests that finished (stop or length).",
            boundaries=E2E_BUCKETS,
        )
        self.queue_time = mk(
            Histogram,
            "nanovllmx_request_queue_time_seconds",
            "From arrival at the engine to first being scheduled.",
            boundaries=QUEUE_BUCKETS,
        )
        self.finished = mk(
            Counter, "nanovllmx_requests_finished", "Requests that ended, by finish reason.", ("finish_reason",)
        )
        self.http = mk(
            Counter, "nanovllmx_http_requests", "HTTP responses, by status code and route.", ("status", "route")
        )
        self._finish_tags = {r: {"finish_reason": r} for r in FINISH_REASONS}

    @classmethod
    def create(cls, model_name: str) -> ServeMetrics | None:
        if not ray_initialized():
            return None
        try:
            return cls(model_name)
        except Exception:  # noqa: BLE001 - metrics must never stop serving
            logger.warning("metrics disabled: could not create them", exc_info=True)
            return None

    # ---- per request
    def request_finished(self, reason: str | None, e2e: float | None) -> None:
        reason = reason or "error"
        self.finished.inc(1, self._finish_tags.get(reason) or {"finish_reason": reason})
        if e2e is not None and reason in ("stop", "length"):
            self.e2e.observe(e2e)

    def http_response(self, status: int, route: str) -> None:
        self.http.inc(1, {"status": str(status), "route": route})

    # ---- engine state
    def engine_stats(self, s: dict[str, Any], d_prompt: int, d_cached: int, d_gen: int, d_preempt: int) -> None:
        self.running.set(s.get("num_running", 0))
        self.waiting.set(s.get("num_waiting", 0))
        self.preempted.set(s.get("num_preempted", 0))
        n = s.get("num_slots") or 0
        if n:
            free, cached = s.get("free_slots", 0), s.get("cached_slots", 0)
            self.kv_usage.set((n - free - cached) / n)
            self.kv_cached.set(cached / n)
            self.kv_slots.set(n)
        pt = s.get("prompt_tokens_total", 0)
        self.hit_rate.set(s.get("cached_prompt_tokens_total", 0) / pt if pt else 0.0)
        if d_prompt > 0:
            self.prompt_tokens.inc(d_prompt)
        if d_cached > 0:
            self.cached_tokens.inc(d_cached)
        if d_gen > 0:
            self.generation_tokens.inc(d_gen)
        if d_preempt > 0:
            self.preemptions.inc(d_preempt)


# ================================================================================ engine stats monitor
class EngineStatsMonitor:
    """Polls `stats_fn()` (an engine's `llm.stats()`) every `interval` seconds in a daemon thread:
    sets the engine gauges, advances the token counters, and every `log_interval` seconds logs one
    INFO line of engine stats (throughput, running/waiting, KV use, hit rate) if the engine was busy
    in that window; nothing when idle, nothing per token."""

    _COUNTERS = ("prompt_tokens_total", "cached_prompt_tokens_total", "generation_tokens_total", "num_preempted_total")

    def __init__(
        self,
        stats_fn: Callable[[], dict[str, Any] | None],
        metrics: ServeMetrics | None = None,
        interval: float = 1.0,
        log_interval: float = 5.0,
        name: str = "",
    ):
        self.stats_fn, self.metrics = stats_fn, metrics
        self.interval, self.log_interval, self.name = interval, log_interval, name
        self._prev: dict[str, int] | None = None
        self._win_start: float | None = None
        self._win = dict.fromkeys(self._COUNTERS, 0)
        self._win_busy = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> EngineStatsMonitor:
        self._thread = threading.Thread(target=self._loop, name="nanovllmx-stats", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        failures = 0
        while not self._stop.wait(self.interval):
            try:
                s = self.stats_fn()
                if s is None:  # the owner is gone
                    return
            except Exception as e:  # noqa: BLE001 - a dead engine is the health check's business
                failures += 1
                if failures == 1:
                    logger.debug("engine stats unavailable: %s", e)
                continue
            failures = 0
            try:
                self.update(s, time.monotonic())
            except Exception:  # noqa: BLE001
                logger.debug("engine stats update failed", exc_info=True)

    def update(self, s: dict[str, Any], now: float) -> str | None:
        """Apply one poll; returns the stats line if one was logged (for tests)."""
        cur = {k: int(s.get(k) or 0) for k in self._COUNTERS}
        prev = self._prev or cur  # the first poll only sets the baseline
        # a counter that went down: a new engine (restarted): count from zero
        delta = {k: cur[k] - prev[k] if cur[k] >= prev[k] else cur[k] for k in self._COUNTERS}
        self._prev = cur
        if self.metrics is not None:
            self.metrics.engine_stats(
                s,
                delta["prompt_tokens_total"],
                delta["cached_prompt_tokens_total"],
                delta["generation_tokens_total"],
                delta["num_preempted_total"],
            )
        if self._win_start is None:
            self._win_start = now
        for k in self._COUNTERS:
            self._win[k] += delta[k]
        if s.get("num_running") or s.get("num_waiting") or any(delta.values()):
            self._win_busy = True
        dt = now - self._win_start
        if dt < self.log_interval:
            return None
        line = None
        if self._win_busy:
            line = self.format_line(s, self._win, dt)
            logger.info("%s", line)
        self._win_start, self._win_busy = now, False
        self._win = dict.fromkeys(self._COUNTERS, 0)
        return line

    def format_line(self, s: dict[str, Any], win: dict[str, int], dt: float) -> str:
        n = s.get("num_slots") or 0
        free, cached = s.get("free_slots", 0), s.get("cached_slots", 0)
        used = (n - free - cached) / n if n else 0.0
        pt, total_pt = win["prompt_tokens_total"], s.get("prompt_tokens_total") or 0
        hit = f"{100 * win['cached_prompt_tokens_total'] / pt:.1f}%" if pt else "-"
        hit_all = f"{100 * (s.get('cached_prompt_tokens_total') or 0) / total_pt:.1f}%" if total_pt else "-"
        who = f"{self.name} " if self.name else ""
        return (
            f"engine {who}stats: generation {win['generation_tokens_total'] / dt:.1f} tok/s, prompt "
            f"{pt / dt:.1f} tok/s, running {s.get('num_running', 0)}, waiting {s.get('num_waiting', 0)}, "
            f"preempted {s.get('num_preempted', 0)} (preemptions {win['num_preempted_total']}), "
            f"KV {100 * used:.1f}% used + "
            f"{100 * cached / n if n else 0:.1f}% cached, prefix hit {hit} (last {dt:.0f}s), {hit_all} (total)"
        )
