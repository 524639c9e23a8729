"""RMSNorm (+ residual add), per-head q/k RMSNorm + RoPE with the K/V store, and SiLU-and-mul as
single Triton kernels: PyTorch spends 6-10 small kernels on each of these, which dominated decode
GPU time."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, N, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr
):
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
        _rmsnorm_kernel[(x2.shape[0],)](
            x2, x2, weight, out, out, x2.stride(0), 0, N, eps, HAS_RES=False, BLOCK=BLOCK, num_warps=4
        )
        return out.view(x.shape)
    r2 = residual.reshape(-1, N)
    res_out = torch.empty_like(out)
    _rmsnorm_kernel[(x2.shape[0],)](
        x2, r2, weight, out, res_out, x2.stride(0), r2.stride(0), N, eps, HAS_RES=True, BLOCK=BLOCK, num_warps=4
    )
    return out.view(x.shape), res_out.view(x.shape)


@triton.jit
def _norm_rope_heads(src, n, w_ptr, cos, sin, dst, eps, R: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr):
    """n heads of D contiguous elements at src: RMSNorm with weight, then neox RoPE (cos/sin
    [1, HALF] of this token's position), stored at dst. Rounds to dst's dtype where HF's RMSNorm
    and rotary code do."""
    r = tl.arange(0, R)[:, None]
    i = tl.arange(0, HALF)[None, :]
    m = r < n
    x1 = tl.load(src + r * D + i, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + r * D + HALF + i, mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)[:, None]
    dt = dst.dtype.element_ty
    n1 = ((x1 * rstd).to(dt).to(tl.float32) * tl.load(w_ptr + i).to(tl.float32)).to(dt).to(tl.float32)
    n2 = ((x2 * rstd).to(dt).to(tl.float32) * tl.load(w_ptr + HALF + i).to(tl.float32)).to(dt).to(tl.float32)
    tl.store(dst + r * D + i, (n1 * cos - n2 * sin).to(dt), mask=m)
    tl.store(dst + r * D + HALF + i, (n2 * cos + n1 * sin).to(dt), mask=m)


@triton.jit
def _qk_norm_rope_store_kernel(
    qkv_ptr,
    stride_t,
    qw_ptr,
    kw_ptr,
    cos_sin_ptr,
    pos_ptr,
    slots_ptr,
    q_ptr,
    k_cache,
    v_cache,
    n_heads,
    n_kv_heads,
    eps,
    RQ: tl.constexpr,
    RK: tl.constexpr,
    D: tl.constexpr,
    HALF: tl.constexpr,
):
    # program t: token t's query heads and key heads (norm + RoPE, one cos/sin load for all) and its
    # value heads (copy), keys and values into the pool at the token's slot
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF)[None, :]
    cos = tl.load(cos_sin_ptr + pos * D + i)
    sin = tl.load(cos_sin_ptr + pos * D + HALF + i)
    row = qkv_ptr + t * stride_t
    _norm_rope_heads(row, n_heads, qw_ptr, cos, sin, q_ptr + t * n_heads * D, eps, RQ, D, HALF)
    kv = slot * n_kv_heads * D
    _norm_rope_heads(row + n_heads * D, n_kv_heads, kw_ptr, cos, sin, k_cache + kv, eps, RK, D, HALF)
    c = tl.arange(0, RK * D)
    tl.store(
        v_cache + kv + c,
        tl.load(row + (n_heads + n_kv_heads) * D + c, mask=c < n_kv_heads * D),
        mask=c < n_kv_heads * D,
    )


def qk_norm_rope_store(
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    cos_sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """Everything between the qkv projection and attention, in one launch (three before: q and k
    norm+RoPE, then the K/V store; at 28 layers a decode step spent more on launches than work).
    qkv: [T, (num_heads + 2*num_kv_heads)*head_dim] rows; per-head RMSNorm (q_weight / k_weight)
    then neox RoPE (cos_sin [max_pos, head_dim]: cos | sin) at positions[t]; keys and values go to
    k_cache[slots[t]] / v_cache[slots[t]] ([S, num_kv_heads, head_dim], contiguous). Returns the
    queries as a new contiguous [T, num_heads, head_dim]; allocates nothing else and never syncs,
    so it can be captured in a CUDA graph."""
    T = qkv.shape[0]
    assert qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim and qkv.stride(1) == 1
    assert head_dim & (head_dim - 1) == 0, "tl.arange needs a power-of-two head_dim"
    assert k_cache.dtype == v_cache.dtype == qkv.dtype and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert k_cache.shape[1:] == v_cache.shape[1:] == (num_kv_heads, head_dim)
    assert cos_sin.shape[1] == head_dim and cos_sin.is_contiguous()
    assert positions.is_contiguous() and slots.is_contiguous()
    q = torch.empty((T, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if T:
        # a program per token, not per head (24 one-warp programs a token before): a 16k-token
        # prefill chunk was 393k programs that each reloaded cos/sin, at ~30% of the copy
        # bandwidth; now ~90%, decode steps unchanged (docs/benchmarks-history.md)
        _qk_norm_rope_store_kernel[(T,)](
            qkv,
            qkv.stride(0),
            q_weight,
            k_weight,
            cos_sin,
            positions,
            slots,
            q,
            k_cache,
            v_cache,
            num_heads,
            num_kv_heads,
            eps,
            RQ=triton.next_power_of_2(num_heads),
            RK=triton.next_power_of_2(num_kv_heads),
            D=head_dim,
            HALF=head_dim // 2,
            num_warps=4,
        )
    return q


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, I, BLOCK: tl.constexpr):  # noqa: E741 - I: the intermediate size, as in the math
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < I
    g = tl.load(x_ptr + row * 2 * I + c, mask=m, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * 2 * I + I + c, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * I + c, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=m)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    T, I2 = x.shape
    I = I2 // 2  # noqa: E741 - the intermediate size, as in the kernel
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


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """k_cache[slots] = k; v_cache[slots] = v in one kernel (PyTorch's index_put takes two).
    k, v: [T, Hkv, D] with contiguous heads (a row stride of their own is fine); caches [S, Hkv, D]."""
    T = k.shape[0]
    N = k.shape[1] * k.shape[2]
    assert k.stride(1) == v.stride(1) == k.shape[2] and k.stride(2) == v.stride(2) == 1 and k_cache.is_contiguous()
    if T:
        _store_kv_kernel[(T,)](k, v, k.stride(0), v.stride(0), slots, k_cache, v_cache, N=N, num_warps=4)
