"""The one logging set-up of our Ray processes (Serve replicas, worker actors)."""

from __future__ import annotations

import logging

from nanovllmx.utils.log import setup_logging


def test_setup_logging_adds_one_handler_and_follows_the_last_level():
    root = logging.getLogger("nanovllmx")
    saved = (root.handlers[:], root.level, root.propagate)
    try:
        setup_logging("warning")
        setup_logging(logging.INFO)  # a worker actor passes its engine's numeric level
        ours = [h for h in root.handlers if getattr(h, "_nanovllmx", False)]
        assert len(ours) == 1  # a second handler would print every line twice
        assert root.level == logging.INFO
        assert logging.getLogger("nanovllmx.worker.worker").isEnabledFor(logging.INFO)
        assert not root.propagate  # Ray's root handler would print it again
    finally:
        root.handlers[:], root.level, root.propagate = saved
