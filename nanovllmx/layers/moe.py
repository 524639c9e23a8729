"""Routed experts (Qwen3-MoE): top-k softmax routing and the experts' SwiGLU MLPs, tensor parallel
over each expert's intermediate dimension (every rank holds a slice of every expert; one
all-reduce per layer, as a dense MLP). On CUDA the experts run as two grouped Triton GEMMs
(kernels/fused_moe.py); elsewhere a per-expert loop computes what transformers computes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanovllmx.distributed.parallel_state import get_parallel_info, tp_all_reduce
from nanovllmx.layers.linear import ShardSlice, _divide, copy_slice


def _fused_moe(x: torch.Tensor) -> bool:
    """Whether the Triton path serves x: on CUDA. A function so that the interpreter test can turn
    it on for CPU tensors."""
    return x.is_cuda


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] in the logits' dtype, expert ids [T, k]) as transformers' Qwen3MoeTopKRouter:
    softmax in float32, top-k, optionally renormalised to sum 1."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def experts_reference(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]), one expert at a time (the order and
    roundings of transformers' Qwen3MoeExperts)."""
    out = torch.zeros_like(x)
    for e in torch.unique(ids).tolist():
        tok, slot = torch.where(ids == e)
        gate, up = F.linear(x[tok], w13[e]).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, w2[e]) * weights[tok, slot, None]
        out.index_add_(0, tok, h.to(out.dtype))
    return out


class FusedMoE(nn.Module):
    """num_experts SwiGLU experts stacked: w13 [E, 2 * I/tp, H] (this rank's gate rows, then its up
    rows), w2 [E, H, I/tp]. Checkpoint tensors arrive one expert and projection at a time through
    weight_loader(param, tensor, (expert, "gate" | "up" | "down"))."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, top_k: int, renormalize: bool):
        super().__init__()
        info = get_parallel_info()
        self.tp_rank, self.tp_size = info.tp_rank, info.tp_size
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.inter = _divide(intermediate_size, self.tp_size)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.inter, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, self.inter), requires_grad=False)
        self.w13.weight_loader = self.weight_loader
        self.w2.weight_loader = self.weight_loader
        self.fp8 = None  # kernels.fp8.Fp8Experts once the FP8 fast path quantized the weights

    def shard_slice(self, shard: tuple[int, str]) -> ShardSlice:
        expert, proj = shard
        n, start = self.inter, self.tp_rank * self.inter
        if proj == "down":
            return ShardSlice(1, 0, start, n, expert)
        return ShardSlice(0, 0 if proj == "gate" else n, start, n, expert)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: tuple[int, str]) -> None:
        copy_slice(param, loaded, self.shard_slice(shard))

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = route(router_logits, self.top_k, self.renormalize)
        if self.fp8 is not None or _fused_moe(x):  # FP8 weights: only the Triton path reads them
            from nanovllmx.kernels.fused_moe import fused_experts

            out = fused_experts(x, self.w13, self.w2, weights, ids, fp8=self.fp8)
        else:
            out = experts_reference(x, self.w13, self.w2, weights, ids)
        return tp_all_reduce(out)
