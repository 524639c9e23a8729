"""How busy a worker's device is: each step's own time (inputs received -> outputs launched) and the
idle time between steps, over a window of recent steps. For a pipeline this is each stage's busy
share, the measure of how well the stages overlap (1.0: the stage never waits)."""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import torch

# a pause longer than this between two steps is the engine waiting for requests, not pipeline idleness
_IDLE_CUTOFF_S = 1.0


class BusyMeter:
    """`begin()` once a step's inputs are there (for a later pipeline stage: after its recv is
    queued), `end()` once its work is launched (before the send). On CUDA the two marks are events
    on the current stream, so they time the device, not the host; off the GPU, perf_counter."""

    def __init__(self, device: torch.device, window: int = 2048):
        self.cuda = device.type == "cuda"
        self._marks: collections.deque[tuple[Any, Any]] = collections.deque(maxlen=window)
        self._start: Any = None
        self._lock = threading.Lock()

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def begin(self) -> None:
        self._start = self._mark()

    def end(self) -> None:
        if self._start is None:
            return
        pair = (self._start, self._mark())
        self._start = None
        with self._lock:
            self._marks.append(pair)

    def _seconds(self, a: Any, b: Any) -> float:
        return float(a.elapsed_time(b)) * 1e-3 if self.cuda else float(b - a)

    def summary(self) -> dict[str, float | int | None]:
        """busy_ms_per_step (mean step time), busy_share (busy / (busy + idle between steps, pauses
        over a second left out)), steps (in the window, completed on the device)."""
        with self._lock:
            marks = list(self._marks)
        if self.cuda:  # only steps the device has finished (query() never blocks)
            marks = [m for m in marks if m[1].query()]
        busy = idle = 0.0
        prev_end = None
        for start, end in marks:
            busy += self._seconds(start, end)
            if prev_end is not None:
                gap = self._seconds(prev_end, start)
                if 0 < gap < _IDLE_CUTOFF_S:
                    idle += gap
            prev_end = end
        n = len(marks)
        return dict(
            busy_ms_per_step=round(1e3 * busy / n, 4) if n else None,
            busy_share=round(busy / (busy + idle), 4) if busy + idle > 0 else None,
            steps=n,
        )
