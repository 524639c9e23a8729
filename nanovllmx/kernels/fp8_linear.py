"""y = x W^T for an FP8 e4m3 weight with block-wise scales (W = w8 * scale_inv[n // QN, k // QK]):
a weight-only FP8 GEMM. Each weight tile is read as FP8 (half the bytes of bf16: decode reads
every weight once a step, so its time halves), widened exactly to the activations' dtype, and the
tile's scale multiplies each BLOCK_K partial product. Activations stay bf16: no activation
quantization error, and no FP8 tensor-core instructions (what Triton's FP8 types need from the GPU
is the e4m3 conversion: compute capability >= 8.9)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MIN_PROGRAMS = 264  # two per SM of an H100 / H200 (132 SMs)


@triton.jit
def _w8_linear_kernel(
    a_ptr,
    w_ptr,
    s_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_wn,
    stride_sn,
    stride_cm,
    HAS_BIAS: tl.constexpr,
    QBLOCK_N: tl.constexpr,
    QBLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    w_rows = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    s_rows = s_ptr + (offs_n // QBLOCK_N) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        a = tl.load(a_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_rows + k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        s = tl.load(s_rows + k0 // QBLOCK_K, mask=n_mask, other=0.0)
        acc += tl.dot(a, w.to(a.dtype)) * s[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def default_tiles(M: int, N: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for an [M, K] x [N, K]^T product."""
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    # decode (small M) has few row tiles: narrower column tiles keep every SM streaming weights
    m_tiles = triton.cdiv(M, block_m)
    block_n = next((b for b in (128, 64) if m_tiles * triton.cdiv(N, b) >= _MIN_PROGRAMS), 32)
    return block_m, block_n, 4, 4


def w8_linear(
    x: torch.Tensor,
    w8: torch.Tensor,
    scale_inv: torch.Tensor,
    qblock: tuple[int, int],
    bias: torch.Tensor | None = None,
    tiles: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """x [..., K] @ dequant(w8 [N, K])^T (+ bias) in x's dtype. `tiles`: (BLOCK_M, BLOCK_N,
    num_warps, num_stages) in place of default_tiles' (benchmarks/fp8_gemm_bench.py sweeps them)."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, N = x2.shape[0], w8.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out.view(*x.shape[:-1], N)
    block_k = 128 if qblock[1] % 128 == 0 else 64
    assert qblock[1] % block_k == 0, "a BLOCK_K step must stay inside one scale block"
    block_m, block_n, warps, stages = tiles or default_tiles(M, N)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _w8_linear_kernel[grid](
        x2,
        w8,
        scale_inv,
        bias if bias is not None else scale_inv,
        out,
        M,
        N,
        K,
        x2.stride(0),
        w8.stride(0),
        scale_inv.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        QBLOCK_N=qblock[0],
        QBLOCK_K=qblock[1],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
        num_stages=stages,
    )
    return out.view(*x.shape[:-1], N)
