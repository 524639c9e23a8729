"""The replica's prompt work off the event loop: chat template renders and prompt encodings run in
their own thread pool (`PromptJobs`), which records when each job started so the health check can
tell stuck workers (a hostile template, a pathological prompt) from busy ones; a client-supplied
template renders under a deadline (`call_with_deadline`) that stops the render itself (a thread
cannot be killed)."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any, TypeVar

T = TypeVar("T")


class RenderTimeout(BaseException):
    """A client's chat template ran past its budget. A BaseException: no `except Exception` in
    Jinja or transformers can swallow it (the tracer that raises it is gone once it has raised)."""


def call_with_deadline(timeout_s: float, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) in this thread, stopped by RenderTimeout once it has run `timeout_s`. A
    thread cannot be killed, so the code stops itself: a `sys.settrace` tracer (this thread only)
    looks at the clock on every Python call and line (a Jinja template is compiled to Python, so
    every loop iteration is one) and raises past the deadline. Code that spends minutes inside
    one C call is not stopped: Jinja's sandbox bounds range() (100 000 items); see docs/serving.md.
    Tracing slows Python several times over: only for templates that clients send."""
    deadline = time.monotonic() + timeout_s

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise RenderTimeout(f"the chat template ran for more than {timeout_s:g} s")
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        return fn(*args, **kwargs)
    finally:
        sys.settrace(previous)


class PromptJobs:
    """The replica's prompt jobs (chat template render, text encoding): run off the event loop in a
    thread pool of their own (the health check never waits behind them), each with its start time.
    A job that runs far longer than any prompt should means a stuck thread: the health check fails
    (`stuck()`), so Serve replaces the replica instead of leaving it up with requests that hang."""

    def __init__(self, max_workers: int | None = None, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._started: dict[int, float] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        workers = max_workers or min(32, (os.cpu_count() or 1) + 4)  # as asyncio's default executor
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="nanovllmx-prompt")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in the pool (the caller's context variables with it, as asyncio.to_thread)."""
        ctx = contextvars.copy_context()
        call = functools.partial(ctx.run, self.timed, fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self.executor, call)

    def timed(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args), tracked from its start (in its thread: a job queued behind stuck ones has not
        started) to its end."""
        key = next(self._ids)
        with self._lock:
            self._started[key] = self.clock()
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._started.pop(key, None)

    def running(self) -> list[float]:
        """How long each job in flight has run, in seconds, longest first."""
        now = self.clock()
        with self._lock:
            starts = list(self._started.values())
        return sorted((now - t for t in starts), reverse=True)

    def stuck(self, after_s: float) -> str | None:
        """Why the prompt workers count as stuck (a job has run longer than `after_s`), or None."""
        ages = [a for a in self.running() if a > after_s]
        if not ages:
            return None
        return (
            f"{len(ages)} prompt job(s) (chat template render / tokenization) running for more than "
            f"{after_s:g} s (the longest {ages[0]:.0f} s): the replica's prompt workers are stuck"
        )

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
