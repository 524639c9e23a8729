"""Tensor/pipeline-parallel groups of this process.

Layers ask here for their TP rank and size; with no groups set up (one process), every collective
is a no-op, so the same model code runs single-device, in tests, and sharded across Ray actors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from nanovllmx.distributed.one_shot_allreduce import OneShotAllReduce


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
# the TP group's one-shot all-reduce for small messages (one_shot_allreduce.py), when enabled
_ONE_SHOT: OneShotAllReduce | None = None


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


def init_one_shot_allreduce(device: torch.device, dtype: torch.dtype) -> bool:
    """Enable the one-shot all-reduce for this rank's TP group (every rank of the group calls this);
    False when the group stays on NCCL."""
    global _ONE_SHOT
    from nanovllmx.distributed.one_shot_allreduce import setup_one_shot

    info = _INFO
    if info.tp_size == 1 or info.tp_group is None:
        return False
    _ONE_SHOT = setup_one_shot(info.tp_group, device, dtype)
    return _ONE_SHOT is not None


def destroy_parallel() -> None:
    global _ONE_SHOT
    _ONE_SHOT = None
    if dist.is_initialized():
        dist.destroy_process_group()
    set_parallel_info(ParallelInfo())


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of x over the TP group: in place through NCCL (gloo on CPU), or into a new tensor
    through the one-shot all-reduce for small messages when it is enabled. Use the return value."""
    info = _INFO
    if info.tp_size > 1:
        one_shot = _ONE_SHOT
        if one_shot is not None and one_shot.applies(x):
            return one_shot(x)
        dist.all_reduce(x, group=info.tp_group)
    return x


def tp_all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    info = _INFO
    if info.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(info.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=info.tp_group)
    return torch.cat(parts, dim=-1)
