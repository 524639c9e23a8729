"""Executors run a ScheduledBatch on the workers. The local one calls a Worker in this process;
the Ray one (nanovllmx/distributed/ray_executor.py) drives one actor per TP x PP shard."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np

from nanovllmx.config import EngineConfig
from nanovllmx.scheduler.messages import ScheduledBatch, StepOutput

if TYPE_CHECKING:
    from nanovllmx.worker.model_runner import DeferredTokens


class StepHandle(Protocol):
    """A launched step. `result()` waits for its sampled token ids (int32 [S], one per sampled row)
    and the logprobs its requests asked for."""

    def result(self) -> StepOutput: ...


class Executor(Protocol):
    """With overlap scheduling (`EngineConfig.overlap_scheduling`) the engine launches step N+1
    before step N's tokens are back: the workers resolve the scheduler's -1 placeholders from
    their own buffer of last sampled tokens."""

    def available_kv_slots(self) -> int: ...
    def init_kv_cache(self, num_slots: int) -> None: ...
    def execute_async(self, batch: ScheduledBatch) -> StepHandle: ...
    def apply_grammar(self, handle: StepHandle, step: int, bitmask: np.ndarray) -> None:
        """Send the grammar masks of a launched step built with `mask_deferred` (its constrained rows
        sample once they arrive). Only called when `defers_grammar`."""
        ...

    @property
    def defers_grammar(self) -> bool:
        """Whether steps may be launched before their grammar masks are known (apply_grammar)."""
        ...

    def mark_idle(self) -> None:
        """The engine is about to wait for requests: the next gap between steps is idleness."""
        ...

    def metrics(self) -> dict[str, Any]: ...

    @property
    def broken(self) -> str | None:
        """Why the workers cannot run another step (then for good), or None."""
        ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    """tp_size = pp_size = 1, the worker in this process."""

    def __init__(self, cfg: EngineConfig):
        from nanovllmx.worker.worker import Worker  # torch/model imports stay off the scheduler-only path

        if cfg.tp_size * cfg.pp_size != 1:
            raise ValueError("LocalExecutor runs one shard; use the Ray executor for tp_size/pp_size > 1")
        self.worker = Worker(cfg)

    def available_kv_slots(self) -> int:
        return self.worker.available_kv_slots()

    def init_kv_cache(self, num_slots: int) -> None:
        self.worker.init_kv_cache(num_slots)

    def execute_async(self, batch: ScheduledBatch) -> StepHandle:
        return cast(StepHandle, self.worker.execute_async(batch))  # one stage, the last: never None

    def apply_grammar(self, handle: StepHandle, step: int, bitmask: np.ndarray) -> None:
        cast("DeferredTokens", handle).apply_grammar(bitmask)

    @property
    def defers_grammar(self) -> bool:
        return True

    def mark_idle(self) -> None:
        pass  # the worker times its own steps; nothing to reset

    def metrics(self) -> dict[str, Any]:
        runner = self.worker.runner  # None once shut down
        return {"worker_step_ms": runner.timer.summary()} if runner is not None else {}

    @property
    def broken(self) -> str | None:
        return None  # a failed step raises in the engine thread, which fails its requests and goes on

    def shutdown(self) -> None:
        self.worker.shutdown()
