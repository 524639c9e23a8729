"""One logging set-up for every process of ours that Ray starts (Serve replicas, worker actors):
the `nanovllmx` loggers write to the process's stderr, which Ray shows under the actor's name."""

from __future__ import annotations

import logging


def setup_logging(level: str | int) -> None:
    """Idempotent per process: our handler is added once; a later call only changes the level."""
    root = logging.getLogger("nanovllmx")
    if not any(getattr(h, "_nanovllmx", False) for h in root.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s"))
        h._nanovllmx = True  # type: ignore[attr-defined]  # marks our handler: set up once per process
        root.addHandler(h)
        root.propagate = False
    root.setLevel(level.upper() if isinstance(level, str) else level)
