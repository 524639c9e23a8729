"""Cheap per-step phase timers (perf_counter sums), for `bench.py --profile` and engine stats."""

from __future__ import annotations

import time
from collections import defaultdict


class PhaseTimer:
    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0
        self._t = 0.0

    def start(self) -> None:
        self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Charge the time since the last start/lap to `phase`."""
        now = time.perf_counter()
        self.totals[phase] += now - self._t
        self._t = now

    def summary(self) -> dict[str, float]:
        """Milliseconds per step for each phase."""
        n = max(self.steps, 1)
        return {k: round(1e3 * v / n, 3) for k, v in self.totals.items()}
