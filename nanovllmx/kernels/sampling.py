"""Temperature sampling for batches without top-k/top-p/min-p filters, in two short kernels that
read the bf16 logits once and draw random numbers for ~1.2k columns of a 152k row, not all of them.

A row is drawn exactly from softmax(logits / T) in two stages: pick a block of BLOCK columns with
probability proportional to its mass (Gumbel-max over the blocks' log-sum-exps), then a column of
that block in proportion to its own (Gumbel-max over the block). Drawing noise for every column
(one-stage Gumbel-max, the previous kernel) made sampling compute-bound on Philox: 190 us a
decode step of 256 rows on an H200 for 18 us of logits; 54-64 us now (docs/benchmarks-history.md).
Greedy rows (1/T == 0) take the argmax. Each row's noise comes from Philox keyed by its own seed
and by column (block choices use the counters from V up), so a seeded row's draw depends neither
on its batch nor on how its row is split among programs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _block_lse_kernel(
    logits_ptr,
    stride,
    inv_temp_ptr,
    lse_ptr,
    part_v_ptr,
    part_i_ptr,
    V,
    n_blocks,
    n_parts,
    NB: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (row, part) over NB blocks of BLOCK columns from part * NB * BLOCK: each block's
    log-sum-exp of logits * inv_t, and the part's max logit with its lowest index (greedy rows)."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    inv_t = tl.load(inv_temp_ptr + row)
    blk = part * NB + tl.arange(0, NB)
    cols = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    m = cols < V
    x = tl.load(logits_ptr + row.to(tl.int64) * stride + cols, mask=m, other=float("-inf")).to(tl.float32)
    top = tl.max(tl.max(x, axis=1), axis=0)
    tl.store(part_v_ptr + row * n_parts + part, top)
    tl.store(part_i_ptr + row * n_parts + part, tl.min(tl.min(tl.where(x == top, cols, V), axis=1), axis=0))
    y = x * inv_t
    mx = tl.max(y, axis=1)
    s = tl.sum(tl.exp(y - tl.where(mx == float("-inf"), 0.0, mx)[:, None]), axis=1)
    tl.store(lse_ptr + row * n_blocks + blk, mx + tl.log(s), mask=blk < n_blocks)  # log 0 = -inf: empty block


@triton.jit
def _pick_kernel(
    logits_ptr,
    stride,
    inv_temp_ptr,
    seed_ptr,
    lse_ptr,
    part_v_ptr,
    part_i_ptr,
    out_ptr,
    V,
    n_blocks,
    n_parts,
    NBP: tl.constexpr,
    P: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    inv_t = tl.load(inv_temp_ptr + row)
    if inv_t > 0:
        seed = tl.load(seed_ptr + row)
        b = tl.arange(0, NBP)
        g = tl.load(lse_ptr + row * n_blocks + b, mask=b < n_blocks, other=float("-inf"))
        g = g - tl.log(-tl.log(tl.rand(seed, V + b)))  # u == 0 gives -inf: never picked
        blk = tl.minimum(tl.min(tl.where(g == tl.max(g, axis=0), b, NBP), axis=0), n_blocks - 1)
        cols = blk * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + row.to(tl.int64) * stride + cols, mask=cols < V, other=float("-inf"))
        x = x.to(tl.float32) * inv_t - tl.log(-tl.log(tl.rand(seed, cols)))
        tok = tl.min(tl.where(x == tl.max(x, axis=0), cols, V), axis=0)
    else:
        p = tl.arange(0, P)
        v = tl.load(part_v_ptr + row * n_parts + p, mask=p < n_parts, other=float("-inf"))
        i = tl.load(part_i_ptr + row * n_parts + p, mask=p < n_parts, other=V)
        tok = tl.min(tl.where(v == tl.max(v, axis=0), i, V), axis=0)
    tl.store(out_ptr + row, tl.where(tok < V, tok, 0))  # NaN logits: a valid id, never one past the vocabulary


_BLOCK = 1024  # columns per block: a 152k vocabulary is 149 blocks
_CHUNK = 8192  # columns per first-stage program (a multiple of _BLOCK): 19 per row fill the GPU


def gumbel_sample(logits: torch.Tensor, inv_temperature: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """logits [B, V] (any float dtype, rows contiguous); inv_temperature float32 [B] (0: greedy);
    seeds int32 [B] (Philox keys). Returns int32 [B] sampled ids."""
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.int32, device=logits.device)
    if B:
        n_blocks = triton.cdiv(V, _BLOCK)
        n_parts = triton.cdiv(V, _CHUNK)
        lse = torch.empty((B, n_blocks), dtype=torch.float32, device=logits.device)
        part_v = torch.empty((B, n_parts), dtype=torch.float32, device=logits.device)
        part_i = torch.empty((B, n_parts), dtype=torch.int32, device=logits.device)
        _block_lse_kernel[(B, n_parts)](
            logits,
            logits.stride(0),
            inv_temperature,
            lse,
            part_v,
            part_i,
            V,
            n_blocks,
            n_parts,
            NB=_CHUNK // _BLOCK,
            BLOCK=_BLOCK,
            num_warps=8,
        )
        _pick_kernel[(B,)](
            logits,
            logits.stride(0),
            inv_temperature,
            seeds,
            lse,
            part_v,
            part_i,
            out,
            V,
            n_blocks,
            n_parts,
            NBP=max(16, triton.next_power_of_2(n_blocks)),
            P=max(16, triton.next_power_of_2(n_parts)),
            BLOCK=_BLOCK,
            num_warps=4,
        )
    return out
