"""Typed errors of the client API: what a caller can catch, and what the HTTP app maps to status
codes (see docs/reliability.md). `EngineRequestError` (a request the engine failed while running
it) lives in `nanovllmx.engine.output_processor` and is exported from `nanovllmx` too."""

from __future__ import annotations


class EngineOverloadedError(RuntimeError):
    """The engine has `max_bs + max_waiting_requests` requests outstanding: this one is refused
    before it is submitted. Retry later (HTTP: 503 with a Retry-After header)."""


class EngineUnavailableError(RuntimeError):
    """The engine takes no new requests: it is shut down or shutting down, or it died (its Ray
    scheduler actor is gone). HTTP: 503."""
