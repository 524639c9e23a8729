"""Loads a HF safetensors checkpoint into a (possibly sharded) model, tensor by tensor, so each
rank reads only the slices it holds. Block-wise FP8 weights (Qwen3-*-FP8) are dequantized here,
whole tensor by whole tensor, before the layers' loaders shard them; a tensor the model has no
place for is an error, never skipped."""

from __future__ import annotations

import contextlib

import torch
from safetensors import safe_open
from torch import nn

from nanovllmx.errors import UnsupportedCheckpointError
from nanovllmx.layers.fp8 import load_block_scale
from nanovllmx.models.checkpoint import Fp8Scheme, weight_files

SCALE_SUFFIX = "_scale_inv"  # `<name>.weight_scale_inv` scales `<name>.weight`
# tensors some checkpoints carry that no engine reads
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def dequantize_block_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: Fp8Scheme) -> torch.Tensor:
    """float32 w * scale_inv[i // block_n, j // block_k] for a 2-D FP8 weight."""
    n, k = w.shape
    sn, sk = -(-n // block.block_n), -(-k // block.block_k)
    if tuple(scale_inv.shape) != (sn, sk):
        raise ValueError(f"weight_scale_inv of shape {list(scale_inv.shape)} for [{n}, {k}], want [{sn}, {sk}]")
    s = scale_inv.float().repeat_interleave(block.block_n, 0)[:n].repeat_interleave(block.block_k, 1)[:, :k]
    return w.float() * s


def load_weights(
    model: nn.Module, path: str, progress: bool = False, fp8: Fp8Scheme | None = None, keep_fp8_scales: bool = False
) -> None:
    """Load every parameter of `model` from the checkpoint at `path`. keep_fp8_scales: the layers
    keep their part of each FP8 weight's block scales (for layers.fp8.quantize_model_fp8)."""
    files = weight_files(path)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    tie_source = getattr(model, "tie", False) and getattr(model, "is_last", False)
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(f, "pt", "cpu")) for f in files]
        where = {name: fh for fh in handles for name in fh.keys()}  # a weight's scale may sit in another file
        names = list(where)
        if progress:
            from tqdm import tqdm

            names = tqdm(names, desc="Loading weights", unit="tensor", mininterval=2.0)
        for name in names:
            if name.endswith(SCALE_SUFFIX) or name.endswith(_IGNORED_SUFFIXES):
                if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] not in where:
                    raise ValueError(f"{path}: {name} scales no tensor of the checkpoint")
                continue
            targets = []
            mapped = model.checkpoint_param_name(name)
            if mapped is not None:
                targets.append(mapped)
            # tied LM head: the last stage reads the embedding matrix as its head
            if tie_source and name in ("model.embed_tokens.weight", "embed_tokens.weight"):
                targets.append(("lm_head.weight", None))
            if not targets:
                continue
            t, scale = _read(where, name, fp8, path)
            for ours, shard in targets:
                if ours not in params:
                    raise UnsupportedCheckpointError(
                        f"{path}: tensor {name} (shape {list(t.shape)}) has no place in {type(model).__name__}; "
                        "is config.json's architectures right for these weights?"
                    )
                p = params[ours]
                t = t.to(p.dtype)
                loader = getattr(p, "weight_loader", None)
                if loader is None:
                    if p.shape != t.shape:
                        raise ValueError(f"{path}: {name} has shape {list(t.shape)}, the model wants {list(p.shape)}")
                    p.data.copy_(t)
                elif shard is None:
                    loader(p, t)
                else:
                    loader(p, t, shard)
                loaded.add(ours)
                if keep_fp8_scales and scale is not None and fp8 is not None:
                    module_name, _, attr = ours.rpartition(".")
                    module = model.get_submodule(module_name)
                    if hasattr(module, "shard_slice"):  # a layer that can run FP8 (not embeddings)
                        load_block_scale(module, attr, shard, t.shape, scale, fp8)
    missing = [n for n in params if n not in loaded]
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights for: {missing[:8]}{'...' if len(missing) > 8 else ''}")


def _read(where: dict, name: str, fp8: Fp8Scheme | None, path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tensor (dequantized if FP8) and its block scales (None unless FP8)."""
    t = where[name].get_tensor(name)
    if t.dtype not in _FP8_DTYPES:
        return t, None
    scale = name + SCALE_SUFFIX
    if fp8 is None or scale not in where:
        # FP8 values without their scales are not the weights: refuse rather than cast them
        raise UnsupportedCheckpointError(
            f"{path}: {name} is {t.dtype} but "
            + ("config.json has no fp8 quantization_config" if fp8 is None else f"the checkpoint has no {scale}")
        )
    scale_inv = where[scale].get_tensor(scale)
    return dequantize_block_fp8(t, scale_inv, fp8), scale_inv
