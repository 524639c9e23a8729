"""Tensor/pipeline-parallel groups of this process.

Layers ask here for their TP rank and size; with no groups set up (one process), every collective
is a no-op, so the same model code runs single-device, in tests, and sharded across Ray actors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelInfo:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: dist.ProcessGroup | None = None
    # global ranks of the previous / next pipeline stage with the same tp_rank
    prev_rank: int | None = None
    next_rank: int | None = None

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


_INFO = ParallelInfo()


def get_parallel_info() -> ParallelInfo:
    return _INFO


def set_parallel_info(info: ParallelInfo) -> None:
    global _INFO
    _INFO = info


def init_parallel(tp_size: int, pp_size: int, rank: int, backend: str, init_method: str | None) -> ParallelInfo:
    """Join the world of tp_size*pp_size ranks (rank = pp_rank * tp_size + tp_rank) and build the
    TP groups. Every rank must call this with the same arguments but its own rank."""
    world = tp_size * pp_size
    dist.init_process_group(backend=backend, init_method=init_method, world_size=world, rank=rank)
    pp_rank, tp_rank = divmod(rank, tp_size)
    tp_group = None
    for p in range(pp_size):  # new_group must be called by every rank for every group
        g = dist.new_group(list(range(p * tp_size, (p + 1) * tp_size)))
        if p == pp_rank:
            tp_group = g
    info = ParallelInfo(
        tp_rank=tp_rank,
        tp_size=tp_size,
        pp_rank=pp_rank,
        pp_size=pp_size,
        tp_group=tp_group,
        prev_rank=rank - tp_size if pp_rank > 0 else None,
        next_rank=rank + tp_size if pp_rank < pp_size - 1 else None,
    )
    set_parallel_info(info)
    return info


def destroy_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    set_parallel_info(ParallelInfo())


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    info = _INFO
    if info.tp_size > 1:
        dist.all_reduce(x, group=info.tp_group)
    return x


def tp_all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    info = _INFO
    if info.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(info.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=info.tp_group)
    return torch.cat(parts, dim=-1)
