"""Typed errors of the client API: what a caller can catch, and what the HTTP app maps to status
codes (see docs/reliability.md). A request refused for its content raises ValueError or TypeError."""

from __future__ import annotations


class EngineOverloadedError(RuntimeError):
    """The engine has `max_bs + max_waiting_requests` requests outstanding: this one is refused
    before it is submitted. Retry later (HTTP: 503 with a Retry-After header)."""


class EngineUnavailableError(RuntimeError):
    """The engine takes no new requests: it is shut down or shutting down, or it died (its Ray
    scheduler actor is gone). HTTP: 503."""


class EngineRequestError(RuntimeError):
    """The engine failed this request after accepting it (an error inside a step, a refusal the
    scheduler made, or the engine dying under it). HTTP: 500, or an error event in a stream."""


class UnsupportedCheckpointError(ValueError):
    """The checkpoint needs something the engine does not implement (an architecture, model_type,
    rope type, quantization scheme or weight format): raised when the engine is created, naming
    what was found and what is supported, never later (models/checkpoint.py)."""
