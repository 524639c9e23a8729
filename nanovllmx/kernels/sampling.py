"""Temperature sampling in one pass over the logits (Gumbel-max), for batches without top-k/top-p/
min-p filters: argmax(logits / T + Gumbel noise) is an exact draw from softmax(logits / T).

The PyTorch path (float copy, divide, softmax, exponential noise, divide, two argmaxes) moves about
2 GB per decode step of 256 rows x 152k vocab, ~0.7 ms on an H100; this reads the bf16 logits once.
Each row draws its noise from Philox keyed by its own seed, so a seeded row's draw does not depend
on the batch it is in."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gumbel_argmax_kernel(logits_ptr, stride, inv_temp_ptr, seed_ptr, part_v_ptr, part_i_ptr, V, n_parts,
                          CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, part): the best (value, index) of logits[row, part*CHUNK : (part+1)*CHUNK]."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    inv_t = tl.load(inv_temp_ptr + row)  # 0 for a greedy row
    seed = tl.load(seed_ptr + row)
    base = logits_ptr + row.to(tl.int64) * stride
    best_v = tl.full((BLOCK,), float("-inf"), tl.float32)
    best_i = tl.zeros((BLOCK,), tl.int32)
    for off in range(part * CHUNK, part * CHUNK + CHUNK, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        m = cols < V
        x = tl.load(base + cols, mask=m, other=float("-inf")).to(tl.float32)
        if inv_t > 0:
            u = tl.rand(seed, cols)  # keyed by column: the same draw whatever the split
            x = x * inv_t - tl.log(-tl.log(u))  # u == 0 gives -inf: never picked
        better = x > best_v  # strict: the first (lowest) index wins ties within a lane
        best_v = tl.where(better, x, best_v)
        best_i = tl.where(better, cols, best_i)
    top = tl.max(best_v, axis=0)
    tl.store(part_v_ptr + row * n_parts + part, top)
    # lowest index among the lanes that hold the maximum
    tl.store(part_i_ptr + row * n_parts + part, tl.min(tl.where(best_v == top, best_i, V), axis=0))


@triton.jit
def _pick_kernel(part_v_ptr, part_i_ptr, out_ptr, n_parts, V, P: tl.constexpr):
    row = tl.program_id(0)
    p = tl.arange(0, P)
    m = p < n_parts
    v = tl.load(part_v_ptr + row * n_parts + p, mask=m, other=float("-inf"))
    i = tl.load(part_i_ptr + row * n_parts + p, mask=m, other=V)
    top = tl.max(v, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(v == top, i, V), axis=0))


_CHUNK = 8192  # columns per program: a 152k vocabulary is 19 programs per row, enough to fill the GPU


def gumbel_sample(logits: torch.Tensor, inv_temperature: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """logits [B, V] (any float dtype, rows contiguous); inv_temperature float32 [B] (0: greedy);
    seeds int32 [B] (Philox keys). Returns int32 [B] sampled ids."""
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.int32, device=logits.device)
    if B:
        n_parts = triton.cdiv(V, _CHUNK)
        part_v = torch.empty((B, n_parts), dtype=torch.float32, device=logits.device)
        part_i = torch.empty((B, n_parts), dtype=torch.int32, device=logits.device)
        _gumbel_argmax_kernel[(B, n_parts)](logits, logits.stride(0), inv_temperature, seeds, part_v, part_i, V,
                                            n_parts, CHUNK=_CHUNK, BLOCK=1024, num_warps=4)
        _pick_kernel[(B,)](part_v, part_i, out, n_parts, V, P=max(16, triton.next_power_of_2(n_parts)), num_warps=1)
    return out
