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

from nanovllmx.layers.linear import ColumnParallelLinear, RowParallelLinear, ShardSlice, copy_slice
from nanovllmx.layers.moe import FusedMoE
from nanovllmx.models.checkpoint import Fp8Scheme

logger = logging.getLogger(__name__)

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def use_fp8_gemm(mode: str, device: torch.device) -> bool:
    """Whether FP8 checkpoints keep FP8 weights (EngineConfig.fp8_gemm). "auto" dequantizes: on an
    H200 the weight-only FP8 Triton GEMM runs the 8B shape's decode at 0.46x of bf16 cuBLAS
    (docs/benchmarks.md, "Qwen3-MoE and FP8"), so it is opt-in ("triton") until an FP8 GEMM pays."""
    if mode != "triton":
        return False
    if not (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)):
        raise ValueError("fp8_gemm='triton' needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper)")
    return True


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


def _block_slice(sl: ShardSlice, block: int, full: int) -> ShardSlice | None:
    """sl in units of scale blocks, or None when this rank's part does not start on the
    checkpoint's block grid (in the checkpoint tensor or in the fused parameter) or ends inside a
    block other than the tensor's last."""
    if sl.dst % block or sl.src % block or (sl.size % block and sl.src + sl.size != full):
        return None
    return ShardSlice(sl.dim, sl.dst // block, sl.src // block, -(-sl.size // block), sl.expert)


def load_block_scale(
    module: nn.Module,
    param_name: str,
    shard: object,
    weight_shape: torch.Size,
    scale_inv: torch.Tensor,
    block: Fp8Scheme,
) -> None:
    """Keep this rank's part of a checkpoint weight_scale_inv, cut as the weight (of weight_shape)
    was (module.shard_slice), on module.fp8_scales[param_name]; None there once a part is off the grid."""
    scales: dict[str, torch.Tensor | None] = module.__dict__.setdefault("fp8_scales", {})
    param = getattr(module, param_name)
    sl = module.shard_slice(shard)
    b = block.block_n if sl.dim == 0 else block.block_k
    bsl = _block_slice(sl, b, weight_shape[sl.dim])
    if bsl is None or (param_name in scales and scales[param_name] is None):
        scales[param_name] = None
        return
    if param_name not in scales:
        *lead, rows, cols = param.shape
        shape = (*lead, -(-rows // block.block_n), -(-cols // block.block_k))
        scales[param_name] = torch.full(shape, float("nan"), dtype=torch.float32, device=param.device)
    copy_slice(scales[param_name], scale_inv.to(param.device, torch.float32), bsl)


def quantize_with_scale(w: torch.Tensor, scale_inv: torch.Tensor, block: Fp8Scheme) -> torch.Tensor:
    """e4m3 of w / scale (each block by its own): the checkpoint's FP8 values again, since w is their
    dequantization rounded to bf16 (2^-9 relative, far below e4m3's spacing)."""
    n, k = w.shape
    s = scale_inv.repeat_interleave(block.block_n, 0)[:n].repeat_interleave(block.block_k, 1)[:, :k]
    return (w.float() / s).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _complete(scale: torch.Tensor | None) -> bool:
    return scale is not None and not bool(torch.isnan(scale).any())


@torch.no_grad()
def quantize_model_fp8(model: nn.Module, block: Fp8Scheme) -> dict[str, int]:
    """Put the layers whose weights came from FP8 tensors (their block scales kept by the loader,
    load_block_scale) on the FP8 GEMM. Returns counts of layers quantized and of layers kept
    dequantized (off the grid)."""
    counts = {"fp8": 0, "kept_dequantized": 0}
    qb = (block.block_n, block.block_k)
    for m in model.modules():
        scales = m.__dict__.pop("fp8_scales", None)
        if not scales:
            continue
        s, s13, s2 = scales.get("weight"), scales.get("w13"), scales.get("w2")
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and s is not None and _complete(s):
            m.fp8 = Fp8Linear(quantize_with_scale(m.weight, s, block), s, qb)
            m.weight = nn.Parameter(torch.empty(0, device=s.device), requires_grad=False)
        elif isinstance(m, FusedMoE) and s13 is not None and s2 is not None and _complete(s13) and _complete(s2):
            w13 = torch.stack([quantize_with_scale(m.w13[e], s13[e], block) for e in range(m.num_experts)])
            w2 = torch.stack([quantize_with_scale(m.w2[e], s2[e], block) for e in range(m.num_experts)])
            m.fp8 = Fp8Experts(w13, s13, w2, s2, qb)
            m.w13 = nn.Parameter(torch.empty(0, device=w13.device), requires_grad=False)
            m.w2 = nn.Parameter(torch.empty(0, device=w2.device), requires_grad=False)
        else:
            counts["kept_dequantized"] += 1
            continue
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
