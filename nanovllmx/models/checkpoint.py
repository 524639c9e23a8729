"""What a checkpoint folder holds, checked against what the engine implements, before any weight is
read: the architecture and model_type, the rope type, the quantization scheme, the weight files.
Anything else is an UnsupportedCheckpointError naming what was found and what is supported: a
checkpoint is never loaded half-understood and generated from wrongly."""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass
from typing import Any

from nanovllmx.errors import UnsupportedCheckpointError

# architecture -> the model_type its config must carry
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
SUPPORTED_ROPE_TYPES = ("default", "yarn")
# the one quantization scheme: Qwen3-*-FP8 (DeepSeek-style e4m3 weights with block-wise weight_scale_inv)
SUPPORTED_QUANTIZATION = "fp8 (fmt e4m3, activation_scheme dynamic, weight_block_size [n, k])"


@dataclass(frozen=True)
class Fp8Scheme:
    """Block-wise FP8 weights: w = fp8 * weight_scale_inv[i // block_n, j // block_k]."""

    block_n: int = 128
    block_k: int = 128


@dataclass(frozen=True)
class CheckpointInfo:
    architecture: str
    model_type: str
    rope: dict[str, Any]  # rope_type, rope_theta and the type's parameters
    fp8: Fp8Scheme | None
    max_positions: int  # the longest context the rope setting supports (context_len's default)


def rope_parameters(cfg: Any) -> dict[str, Any]:
    """The rope settings in one spelling: transformers >= 5 keeps them in `rope_parameters` (with
    rope_theta inside), older configs in `rope_scaling` plus a top-level `rope_theta`."""
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    if "rope_type" not in params:
        params["rope_type"] = params.get("type", "default")
    if params.get("rope_theta") is None:
        theta = getattr(cfg, "rope_theta", None)
        params["rope_theta"] = float(theta) if theta is not None else 1e6  # Qwen3's
    return params


def max_positions(cfg: Any) -> int:
    """Longest supported context: max_position_embeddings, or with YaRN original x factor (the
    context it is configured for, as vLLM derives it) when that is longer."""
    n = int(cfg.max_position_embeddings)
    rope = rope_parameters(cfg)
    if rope["rope_type"] == "yarn":
        orig = rope.get("original_max_position_embeddings")
        if orig and rope.get("factor"):
            n = max(n, int(math.floor(orig * float(rope["factor"]))))
    return n


def _refuse(path: str, what: str, found: Any, supported: Any) -> UnsupportedCheckpointError:
    return UnsupportedCheckpointError(f"{path}: unsupported {what} {found!r}; nanovllmx supports {supported}")


def _fp8_scheme(path: str, q: Any) -> Fp8Scheme | None:
    if not q:
        return None
    q = q if isinstance(q, dict) else q.to_dict()
    method = q.get("quant_method")
    if method != "fp8":
        raise _refuse(path, "quantization_config.quant_method", method, SUPPORTED_QUANTIZATION)
    if q.get("fmt", "e4m3") != "e4m3":
        raise _refuse(path, "fp8 fmt", q.get("fmt"), SUPPORTED_QUANTIZATION)
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise _refuse(path, "fp8 activation_scheme", q.get("activation_scheme"), SUPPORTED_QUANTIZATION)
    block = q.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        # per-tensor / per-channel FP8 (no weight_block_size) has other scale tensors: not implemented
        raise _refuse(path, "fp8 weight_block_size", block, SUPPORTED_QUANTIZATION)
    return Fp8Scheme(block[0], block[1])


def weight_files(path: str) -> list[str]:
    """The checkpoint's *.safetensors files; a .bin-only (pickle) checkpoint is refused by name."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        return files
    bins = sorted(glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt")))
    if bins:
        names = ", ".join(os.path.basename(b) for b in bins[:3])
        raise UnsupportedCheckpointError(
            f"{path}: only PyTorch pickle weights found ({names}); nanovllmx loads *.safetensors only "
            "(pickles can run code when read). Convert once, e.g. "
            "AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True)"
        )
    raise FileNotFoundError(f"no *.safetensors files in {path}")


def inspect_checkpoint(path: str, cfg: Any) -> CheckpointInfo:
    """Check a loaded HF config (and the folder's weight files) against what the engine implements."""
    archs = list(getattr(cfg, "architectures", None) or [])
    model_type = getattr(cfg, "model_type", None)
    supported_archs = sorted(SUPPORTED_ARCHITECTURES)
    if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise _refuse(path, "architectures", archs, supported_archs)
    arch = archs[0]
    if model_type != SUPPORTED_ARCHITECTURES[arch]:
        raise UnsupportedCheckpointError(
            f"{path}: architectures {archs} needs model_type {SUPPORTED_ARCHITECTURES[arch]!r}, found "
            f"{model_type!r}; supported pairs: {SUPPORTED_ARCHITECTURES}"
        )
    if arch == "Qwen3MoeForCausalLM" and not int(getattr(cfg, "num_experts", 0) or 0) > 0:
        raise _refuse(path, "num_experts for Qwen3MoeForCausalLM", getattr(cfg, "num_experts", None), "> 0")
    rope = rope_parameters(cfg)
    if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise _refuse(path, "rope type", rope["rope_type"], list(SUPPORTED_ROPE_TYPES))
    if rope["rope_type"] == "yarn":
        for key in ("factor", "original_max_position_embeddings"):
            if not rope.get(key):
                raise UnsupportedCheckpointError(f"{path}: yarn rope_scaling lacks {key!r} (found {rope})")
    if getattr(cfg, "use_sliding_window", False):
        raise _refuse(path, "use_sliding_window", True, "full attention only (use_sliding_window false)")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise _refuse(path, "hidden_act", cfg.hidden_act, "silu")
    fp8 = _fp8_scheme(path, getattr(cfg, "quantization_config", None))
    weight_files(path)
    return CheckpointInfo(arch, model_type, rope, fp8, max_positions(cfg))
