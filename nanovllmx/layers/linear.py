"""Tensor-parallel linear layers. Each knows its TP rank and loads only its slice of a checkpoint
tensor through `weight_loader(param, full_tensor, shard_id)`; `shard_slice(shard_id)` says which
slice goes where (the FP8 loader cuts block scales by it too)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanovllmx.distributed.parallel_state import get_parallel_info, tp_all_reduce


def _divide(a: int, b: int) -> int:
    if a % b:
        raise ValueError(f"{a} is not divisible by tensor-parallel size {b}")
    return a // b


@dataclass(frozen=True)
class ShardSlice:
    """This rank's part of a checkpoint tensor: loaded.narrow(dim, src, size) goes to
    param.narrow(dim, dst, size) (of param[expert] for stacked experts)."""

    dim: int
    dst: int
    src: int
    size: int
    expert: int | None = None


def copy_slice(param: torch.Tensor, loaded: torch.Tensor, sl: ShardSlice) -> None:
    dst = param.data if sl.expert is None else param.data[sl.expert]
    dst.narrow(sl.dim, sl.dst, sl.size).copy_(loaded.narrow(sl.dim, sl.src, sl.size))


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split along the output dim; each rank holds output_size / tp rows."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__()
        info = get_parallel_info()
        self.tp_rank, self.tp_size = info.tp_rank, info.tp_size
        self.output_size_per_rank = _divide(output_size, self.tp_size)
        self.weight = nn.Parameter(torch.empty(self.output_size_per_rank, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.fp8 = None  # layers.fp8.Fp8Linear once the FP8 fast path quantized the weight
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.output_size_per_rank), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def shard_slice(self, shard_id=None) -> ShardSlice:
        n = self.output_size_per_rank
        return ShardSlice(0, 0, self.tp_rank * n, n)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        copy_slice(param, loaded, self.shard_slice(shard_id))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8 is not None:
            return self.fp8(x, self.bias)
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul (gate+up)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def shard_slice(self, shard_id=None) -> ShardSlice:
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        return ShardSlice(0, offset, self.tp_rank * size, size)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k, v projections fused. Query heads are split across ranks; KV heads are split too, or
    replicated when there are fewer KV heads than ranks (each rank keeps the head its queries use)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        tp = get_parallel_info().tp_size
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp)
        if num_kv_heads >= tp:
            self.num_kv_heads = _divide(num_kv_heads, tp)
        else:
            _divide(tp, num_kv_heads)
            self.num_kv_heads = 1
        self.total_num_kv_heads = num_kv_heads
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, out, bias)

    def shard_slice(self, shard_id=None) -> ShardSlice:
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, start = 0, q, self.tp_rank * q
        else:
            offset = q if shard_id == "k" else q + kv
            size = kv
            # with replication several ranks read the same KV head
            kv_head = (
                self.tp_rank * self.total_num_kv_heads // self.tp_size
                if self.total_num_kv_heads < self.tp_size
                else self.tp_rank * self.num_kv_heads
            )
            start = kv_head * self.head_dim
        return ShardSlice(0, offset, start, size)


class RowParallelLinear(nn.Module):
    """y = x W^T with W split along the input dim; partial sums are all-reduced across TP ranks."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__()
        info = get_parallel_info()
        self.tp_rank, self.tp_size = info.tp_rank, info.tp_size
        self.input_size_per_rank = _divide(input_size, self.tp_size)
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_rank), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.fp8 = None  # layers.fp8.Fp8Linear once the FP8 fast path quantized the weight
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = lambda p, w, s=None: p.data.copy_(w)

    def shard_slice(self, shard_id=None) -> ShardSlice:
        n = self.input_size_per_rank
        return ShardSlice(1, 0, self.tp_rank * n, n)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        copy_slice(param, loaded, self.shard_slice(shard_id))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bias added once, after the reduction
        y = self.fp8(x) if self.fp8 is not None else F.linear(x, self.weight)
        y = tp_all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y


class ReplicatedLinear(nn.Module):
    """y = x W^T with the whole W on every rank (small matrices such as an MoE router)."""

    def __init__(self, input_size: int, output_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)
