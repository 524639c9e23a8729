"""Executors run a ScheduledBatch on the workers. The local one calls a Worker in this process;
the Ray one (nanovllmx/distributed/ray_executor.py) drives one actor per TP x PP shard."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from nanovllmx.config import EngineConfig
from nanovllmx.scheduler.messages import ScheduledBatch


class Executor(Protocol):
    # True if the workers resolve the scheduler's -1 placeholders (the previous step's samples)
    # on their own, so the engine may schedule step N+1 before step N's tokens come back
    supports_overlap: bool

    def available_kv_slots(self) -> int: ...
    def init_kv_cache(self, num_slots: int) -> None: ...
    def execute(self, batch: ScheduledBatch) -> np.ndarray: ...
    def shutdown(self) -> None: ...


class LocalExecutor:
    """tp_size = pp_size = 1, the worker in this process."""

    supports_overlap = True

    def __init__(self, cfg: EngineConfig):
        from nanovllmx.worker.worker import Worker  # torch/model imports stay off the scheduler-only path

        if cfg.tp_size * cfg.pp_size != 1:
            raise ValueError("LocalExecutor runs one shard; use the Ray executor for tp_size/pp_size > 1")
        self.worker = Worker(cfg)

    def available_kv_slots(self) -> int:
        return self.worker.available_kv_slots()

    def init_kv_cache(self, num_slots: int) -> None:
        self.worker.init_kv_cache(num_slots)

    def execute(self, batch: ScheduledBatch) -> np.ndarray:
        return self.worker.execute(batch)

    def execute_async(self, batch: ScheduledBatch):
        return self.worker.execute_async(batch)

    def shutdown(self) -> None:
        self.worker.shutdown()
