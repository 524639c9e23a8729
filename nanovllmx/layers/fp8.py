"""The FP8 fast path: after a block-wise FP8 checkpoint is loaded (dequantized by the loader, then
sharded by the layers), each projection that was FP8 in the checkpoint is quantized back to e4m3
with 128 x 128 block scales on its shard, and runs through the weight-only FP8 Triton GEMM
(kernels/fp8_linear.py, kernels/fused_moe.py). Quantizing amax/448 blocks on the checkpoint's own
block grid gives back the checkpoint's FP8 values (tests/unit/test_checkpoints.py checks the round
trip), so a shard whose boundaries fall on that grid holds exactly the checkpoint's weights. A
layer whose shard boundaries do not (e.g. an intermediate size / tp that is no multiple of 128)
keeps the dequantized weights: correct, not faster, and logged.

The cost of this design: while loading, the model is held at the activation dtype's size."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from nanovllmx.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from nanovllmx.layers.moe import FusedMoE
from nanovllmx.models.checkpoint import Fp8Scheme

logger = logging.getLogger(__name__)

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def use_fp8_gemm(mode: str, device: torch.device) -> bool:
    """Whether FP8 checkpoints keep FP8 weights (EngineConfig.fp8_gemm)."""
    if mode == "dequant":
        return False
    ok = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
    if mode == "triton" and not ok:
        raise ValueError("fp8_gemm='triton' needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper)")
    return ok


def quantize_block_fp8(w: torch.Tensor, block: Fp8Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, float32 scale_inv [ceil(n / bn), ceil(k / bk)]) with each block's amax at 448."""
    n, k = w.shape
    bn, bk = block.block_n, block.block_k
    sn, sk = -(-n // bn), -(-k // bk)
    padded = torch.zeros((sn * bn, sk * bk), dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()
    blocks = padded.view(sn, bn, sk, bk)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp_(min=1e-12)
    q = (blocks / scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(sn * bn, sk * bk)[:n, :k].contiguous(), scale


@dataclass
class Fp8Linear:
    weight: torch.Tensor  # e4m3 [n, k]
    scale_inv: torch.Tensor  # float32 [ceil(n / bn), ceil(k / bk)]
    block: tuple[int, int]

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        from nanovllmx.kernels.fp8_linear import w8_linear

        return w8_linear(x, self.weight, self.scale_inv, self.block, bias)


@dataclass
class Fp8Experts:
    w13: torch.Tensor  # e4m3 [E, 2I, H]
    w13_scale: torch.Tensor  # float32 [E, ceil(2I / bn), ceil(H / bk)]
    w2: torch.Tensor  # e4m3 [E, H, I]
    w2_scale: torch.Tensor
    block: tuple[int, int]


def _aligned(parts: list[int], b: int, sharded: bool) -> bool:
    """Whether a dim made of `parts` (fused projections, each this rank's slice) lies on the
    checkpoint's b-grid: every part but the last starts a block, and so does every rank's slice."""
    return all(p % b == 0 for p in parts[:-1]) and (not sharded or parts[-1] % b == 0)


def _out_parts(m: ColumnParallelLinear) -> list[int]:
    if isinstance(m, QKVParallelLinear):
        q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
        return [q, kv, kv]
    if isinstance(m, MergedColumnParallelLinear):
        return [s // m.tp_size for s in m.output_sizes]
    return [m.output_size_per_rank]


def linear_on_grid(m: nn.Module, block: Fp8Scheme) -> bool:
    if isinstance(m, ColumnParallelLinear):
        return _aligned(_out_parts(m), block.block_n, m.tp_size > 1)
    if isinstance(m, RowParallelLinear):
        return _aligned([m.input_size_per_rank], block.block_k, m.tp_size > 1)
    return False


def experts_on_grid(m: FusedMoE, block: Fp8Scheme) -> bool:
    return _aligned([m.inter, m.inter], block.block_n, m.tp_size > 1) and _aligned(
        [m.inter], block.block_k, m.tp_size > 1
    )


def _quantize_stack(w: torch.Tensor, block: Fp8Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    qs, ss = zip(*(quantize_block_fp8(w[e], block) for e in range(w.shape[0])))
    return torch.stack(qs), torch.stack(ss)


@torch.no_grad()
def quantize_model_fp8(model: nn.Module, block: Fp8Scheme, fp8_params: set[str]) -> dict[str, int]:
    """Put the layers whose weights came from FP8 tensors on the FP8 GEMM. Returns counts of
    layers quantized and of layers kept dequantized (off the grid)."""
    counts = {"fp8": 0, "kept_dequantized": 0}
    qb = (block.block_n, block.block_k)
    for name, m in model.named_modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and f"{name}.weight" in fp8_params:
            if not linear_on_grid(m, block):
                counts["kept_dequantized"] += 1
                continue
            w8, s = quantize_block_fp8(m.weight, block)
            m.fp8 = Fp8Linear(w8, s, qb)
            m.weight = nn.Parameter(torch.empty(0, device=w8.device), requires_grad=False)
            counts["fp8"] += 1
        elif isinstance(m, FusedMoE) and f"{name}.w13" in fp8_params:
            if not experts_on_grid(m, block):
                counts["kept_dequantized"] += 1
                continue
            w13, s13 = _quantize_stack(m.w13, block)
            w2, s2 = _quantize_stack(m.w2, block)
            m.fp8 = Fp8Experts(w13, s13, w2, s2, qb)
            m.w13 = nn.Parameter(torch.empty(0, device=w13.device), requires_grad=False)
            m.w2 = nn.Parameter(torch.empty(0, device=w2.device), requires_grad=False)
            counts["fp8"] += 1
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the freed bf16 weights: room for the KV pool, which is sized next
    if counts["kept_dequantized"]:
        logger.warning(
            "FP8: %d layers keep dequantized weights: their shards (or fused parts) do not start on the "
            "checkpoint's %dx%d scale blocks (%d layers run FP8 GEMMs)",
            counts["kept_dequantized"],
            block.block_n,
            block.block_k,
            counts["fp8"],
        )
    return counts
