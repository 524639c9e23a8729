"""`LLMEngine`: the engine of an app with several HTTP frontends (build_app's `frontends` > 1, vLLM's
`--api-server-count`). One replica, no HTTP: it starts the engine on Ray (scheduler actor and
workers, in the replica's gang placement group) and hands its actor handles to the `LLMServer`
frontends, which attach to it (`LLM(attach_to=...)`), so token streaming is spread over several
processes while the engine stays one. It exports the engine-level metrics and stats log line; each
frontend exports its own requests' metrics. See docs/serving.md, "Several HTTP frontends"."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from contextlib import suppress
from typing import Any

from ray import serve

from nanovllmx.engine.protocol import EngineClient
from nanovllmx.metrics import ServeMetrics
from nanovllmx.serve import model_resolver
from nanovllmx.serve.app import start_stats_monitor
from nanovllmx.utils.log import setup_logging

logger = logging.getLogger("nanovllmx.serve")


class LLMEngineImpl:
    """One engine shared by the frontends; Serve replaces it (and, through their health checks,
    its frontends) when it fails."""

    def __init__(
        self,
        model: str,
        served_model_name: str,
        engine_kwargs: dict[str, Any],
        revision: str | None = None,
        log_level: str = "INFO",
        shutdown_timeout_s: float = 30.0,
    ):
        from nanovllmx import LLM

        setup_logging(log_level)
        t0 = time.perf_counter()
        self.llm: EngineClient = LLM(model_resolver.resolve_model(model, revision), **engine_kwargs)
        self.shutdown_timeout_s = float(shutdown_timeout_s)
        self._closed = False
        me = weakref.ref(self)  # the poller must not keep the replica alive

        def engine_stats() -> dict[str, Any] | None:
            owner = me()
            return owner.llm.stats() if owner is not None else None

        self._stats_monitor = start_stats_monitor(engine_stats, ServeMetrics.create(served_model_name))
        logger.info("LLMEngine ready: model=%s, loaded in %.1fs", model, time.perf_counter() - t0)

    async def attachment(self) -> Any:
        """What a frontend's `LLM(attach_to=...)` needs (the engine's actor handles); raises
        EngineUnavailableError while this engine cannot serve (a frontend then waits for the
        replacement rather than attaching to dead actors)."""
        await asyncio.to_thread(self.llm.check_health)
        return self.llm.attachment()

    async def check_health(self) -> None:
        """Serve's health check: raising (EngineUnavailableError) has Serve replace this replica."""
        await asyncio.to_thread(self.llm.check_health)

    def __del__(self) -> None:
        """Serve removes the replica: the frontends are drained at the same time, so requests still
        running in the engine (theirs) may finish for up to `shutdown_timeout_s`; then it stops."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._stats_monitor.stop()
        deadline = time.monotonic() + self.shutdown_timeout_s
        with suppress(Exception):
            while time.monotonic() < deadline:
                s = self.llm.stats()
                if not (s.get("num_running") or s.get("num_waiting")):
                    break
                time.sleep(0.2)
        with suppress(Exception):
            self.llm.shutdown()


LLMEngine = serve.deployment(name="LLMEngine")(LLMEngineImpl)
