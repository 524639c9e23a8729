"""RMSNorm (+ residual add), per-head q/k RMSNorm + RoPE, and SiLU-and-mul as single Triton
kernels: PyTorch spends 6-10 small kernels on each of these, which dominated decode GPU time."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, N, eps,
                    HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x = x + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = x.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * N + cols, x, mask=mask)
        x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32) * w  # rounding order as in HF
    tl.store(out_ptr + row * N + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Returns norm(x [+ residual]) and, with a residual, the new residual (x + residual)."""
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    out = torch.empty((x2.shape[0], N), dtype=x.dtype, device=x.device)
    BLOCK = triton.next_power_of_2(N)
    if residual is None:
        _rmsnorm_kernel[(x2.shape[0],)](x2, x2, weight, out, out, x2.stride(0), 0, N, eps,
                                        HAS_RES=False, BLOCK=BLOCK, num_warps=4)
        return out.view(x.shape)
    r2 = residual.reshape(-1, N)
    res_out = torch.empty_like(out)
    _rmsnorm_kernel[(x2.shape[0],)](x2, r2, weight, out, res_out, x2.stride(0), r2.stride(0), N, eps,
                                    HAS_RES=True, BLOCK=BLOCK, num_warps=4)
    return out.view(x.shape), res_out.view(x.shape)


@triton.jit
def _head_norm_rope_kernel(src_ptr, stride_t, w_ptr, cos_sin_ptr, pos_ptr, dst_ptr, n_heads, eps,
                           D: tl.constexpr, HALF: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF)
    base = src_ptr + t.to(tl.int64) * stride_t + h * D
    x1 = tl.load(base + i).to(tl.float32)
    x2 = tl.load(base + HALF + i).to(tl.float32)
    rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / D + eps)
    dt = dst_ptr.dtype.element_ty
    n1 = ((x1 * rstd).to(dt).to(tl.float32) * tl.load(w_ptr + i).to(tl.float32)).to(dt).to(tl.float32)
    n2 = ((x2 * rstd).to(dt).to(tl.float32) * tl.load(w_ptr + HALF + i).to(tl.float32)).to(dt).to(tl.float32)
    cos = tl.load(cos_sin_ptr + pos * D + i)
    sin = tl.load(cos_sin_ptr + pos * D + HALF + i)
    out = dst_ptr + (t.to(tl.int64) * n_heads + h) * D
    tl.store(out + i, (n1 * cos - n2 * sin).to(dt))
    tl.store(out + HALF + i, (n2 * cos + n1 * sin).to(dt))


def head_norm_rope(x: torch.Tensor, n_heads: int, head_dim: int, weight: torch.Tensor, eps: float,
                   cos_sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x: [T, >= n_heads*head_dim] rows (a column slice of the fused qkv output is fine).
    Returns RMSNorm(head) then neox RoPE, as a contiguous [T, n_heads, head_dim]."""
    T = x.shape[0]
    out = torch.empty((T, n_heads, head_dim), dtype=x.dtype, device=x.device)
    if T:
        _head_norm_rope_kernel[(T, n_heads)](x, x.stride(0), weight, cos_sin, positions, out, n_heads, eps,
                                             D=head_dim, HALF=head_dim // 2, num_warps=1)
    return out


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, I, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < I
    g = tl.load(x_ptr + row * 2 * I + c, mask=m, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * 2 * I + I + c, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * I + c, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=m)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    T, I2 = x.shape
    I = I2 // 2
    out = torch.empty((T, I), dtype=x.dtype, device=x.device)
    BLOCK = 1024
    if T:
        _silu_mul_kernel[(T, triton.cdiv(I, BLOCK))](x.contiguous(), out, I, BLOCK=BLOCK, num_warps=4)
    return out


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, stride_k, stride_v, slots_ptr, k_cache, v_cache, N: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    c = tl.arange(0, N)
    tl.store(k_cache + slot * N + c, tl.load(k_ptr + t * stride_k + c))
    tl.store(v_cache + slot * N + c, tl.load(v_ptr + t * stride_v + c))


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k_cache[slots] = k; v_cache[slots] = v in one kernel (PyTorch's index_put takes two).
    k, v: [T, Hkv, D] with contiguous heads (a row stride of their own is fine); caches [S, Hkv, D]."""
    T = k.shape[0]
    N = k.shape[1] * k.shape[2]
    assert k.stride(1) == v.stride(1) == k.shape[2] and k.stride(2) == v.stride(2) == 1 and k_cache.is_contiguous()
    if T:
        _store_kv_kernel[(T,)](k, v, k.stride(0), v.stride(0), slots, k_cache, v_cache, N=N, num_warps=4)
