"""Routed experts as two grouped GEMMs (the scheme of vLLM's fused_moe, written small): the T x k
(token, expert) pairs are sorted by expert and each expert's run is padded to a multiple of
BLOCK_M, so every BLOCK_M-row tile of the GEMM belongs to one expert and reads that expert's
weights. Sorting is done with torch ops on the device, without a host sync (CUDA-graph safe):
tiles past the real end read the count and exit. Weights are bf16/fp16, or FP8 e4m3 with
block-wise scales (the FP8 fast path; the scale is applied to each BLOCK_K partial product)."""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from nanovllmx.kernels.fused import silu_and_mul


def align_block_size(ids: torch.Tensor, num_experts: int, block_m: int):
    """For expert ids [T, k]: (sorted_ids, block_experts, num_padded). sorted_ids [P] lists the
    flat pair indices (t * k + j) grouped by expert, each group padded with T*k to a multiple of
    block_m; block_experts[b] is the expert of tile b; num_padded[0] the used length of sorted_ids.
    P = T*k + E*(block_m - 1), the most padding can take."""
    flat = ids.flatten().long()
    n = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.long, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    first_of = torch.cumsum(counts, 0) - counts  # index in `order` where each expert's run starts
    dest = (ends - padded)[sorted_e] + torch.arange(n, device=ids.device) - first_of[sorted_e]
    size = n + num_experts * (block_m - 1)
    sorted_ids = torch.full((size,), n, dtype=torch.int32, device=ids.device)
    sorted_ids[dest] = order.to(torch.int32)
    tile_starts = torch.arange(0, size, block_m, device=ids.device)
    block_experts = torch.searchsorted(ends, tile_starts, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_ids, block_experts, ends[-1:].to(torch.int32)


@triton.jit
def _moe_gemm_kernel(
    a_ptr,
    w_ptr,
    s_ptr,
    c_ptr,
    topk_w_ptr,
    sorted_ids_ptr,
    block_experts_ptr,
    num_padded_ptr,
    N,
    K,
    num_pairs,
    stride_am,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_cm,
    A_DIV: tl.constexpr,  # pair -> row of A: top_k for the first GEMM (A = tokens), 1 for the second
    MUL_WEIGHT: tl.constexpr,
    FP8: tl.constexpr,
    QBLOCK_N: tl.constexpr,
    QBLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs).to(tl.int64)
    valid = pair < num_pairs
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + (pair // A_DIV)[:, None] * stride_am
    w_rows = w_ptr + expert * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        a = tl.load(a_rows + k[None, :], mask=valid[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_rows + k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # [BK, BN]
        if FP8:
            s = tl.load(s_ptr + expert * stride_se + (offs_n // QBLOCK_N) * stride_sn + k0 // QBLOCK_K, mask=n_mask)
            acc += tl.dot(a, w.to(a.dtype)) * s[None, :]
        else:
            acc += tl.dot(a, w)
    if MUL_WEIGHT:
        acc = acc * tl.load(topk_w_ptr + pair, mask=valid, other=0.0).to(tl.float32)[:, None]
    c = c_ptr + pair[:, None] * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


def _block_m(num_pairs: int, num_experts: int) -> int:
    per_expert = num_pairs / num_experts
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


def moe_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    routing: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int],
    a_div: int,
    topk_weights: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    qblock: tuple[int, int] = (128, 128),
) -> None:
    """out[pair] = A[pair // a_div] @ w[expert(pair)]^T (x its routing weight if given) for every pair."""
    sorted_ids, block_experts, num_padded, block_m = routing
    E, N, K = w.shape
    fp8 = scale is not None
    block_k = 128 if fp8 and qblock[1] % 128 == 0 else 64 if fp8 and qblock[1] % 64 == 0 else 32
    if fp8:
        assert qblock[1] % block_k == 0, "a BLOCK_K step must stay inside one scale block"
    grid = (sorted_ids.numel() // block_m, triton.cdiv(N, 64))
    s = scale if scale is not None else w
    _moe_gemm_kernel[grid](
        a,
        w,
        s,
        out,
        topk_weights if topk_weights is not None else a,
        sorted_ids,
        block_experts,
        num_padded,
        N,
        K,
        out.shape[0],
        a.stride(0),
        w.stride(0),
        w.stride(1),
        s.stride(0),
        s.stride(1),
        out.stride(0),
        A_DIV=a_div,
        MUL_WEIGHT=topk_weights is not None,
        FP8=fp8,
        QBLOCK_N=qblock[0],
        QBLOCK_K=qblock[1],
        BLOCK_M=block_m,
        BLOCK_N=64,
        BLOCK_K=block_k,
        num_warps=4,
        num_stages=3,
    )


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    fp8: Any = None,
) -> torch.Tensor:
    """sum_k weights[t, k] * down(silu(gate(x)) * up(x)) of expert ids[t, k]: the Triton twin of
    layers.moe.experts_reference. fp8: a layers.fp8.Fp8Experts (FP8 weights + scales) or None."""
    T, H = x.shape
    top_k = ids.shape[1]
    if T == 0:
        return torch.zeros_like(x)
    if fp8 is not None:
        w13, w2 = fp8.w13, fp8.w2
    E, N2, _ = w13.shape
    x = x.contiguous()
    block_m = _block_m(T * top_k, E)
    sorted_ids, block_experts, num_padded = align_block_size(ids, E, block_m)
    routing = (sorted_ids, block_experts, num_padded, block_m)
    kw: dict[str, Any] = {}
    h1 = torch.empty((T * top_k, N2), dtype=x.dtype, device=x.device)
    if fp8 is not None:
        kw = dict(scale=fp8.w13_scale, qblock=fp8.block)
    moe_gemm(x, w13, h1, routing, top_k, **kw)
    act = silu_and_mul(h1)
    h2 = torch.empty((T * top_k, H), dtype=x.dtype, device=x.device)
    if fp8 is not None:
        kw = dict(scale=fp8.w2_scale, qblock=fp8.block)
    moe_gemm(act, w2, h2, routing, 1, topk_weights=weights.flatten().contiguous(), **kw)
    return h2.view(T, top_k, H).sum(dim=1)
