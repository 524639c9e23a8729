"""What the engine refuses at load (models/checkpoint.py, models/loader.py), with a message naming
what was found and what is supported; YaRN's context default; the FP8 block helpers against a
straightforward per-block computation. Checkpoints here are the tiny one with an edited
config.json (weights linked, not copied)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovllmx import UnsupportedCheckpointError
from nanovllmx.config import EngineConfig
from nanovllmx.models.checkpoint import Fp8Scheme
from nanovllmx.models.loader import dequantize_block_fp8


def _variant(src: Path, dst: Path, weights: bool = True, **config_changes) -> Path:
    """src's files linked into dst, config.json edited (a value None deletes the key)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json" and (weights or not f.name.endswith(".safetensors")):
            os.symlink(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    for k, v in config_changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(architectures=["LlamaForCausalLM"], model_type="llama"), r"architectures \['LlamaForCausalLM'\].*Qwen3"),
        (dict(architectures=["Qwen3MoeForCausalLM"]), r"needs model_type 'qwen3_moe', found 'qwen3'"),
        (dict(architectures=None), r"architectures \[\]"),
        (
            dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, rope_parameters=None),
            r"rope type 'dynamic'.*\['default', 'yarn'\]",
        ),
        (dict(model_type="qwen9"), r"config\.json not understood.*qwen9"),
        (dict(quantization_config={"quant_method": "awq", "bits": 4}), r"quant_method 'awq'.*fp8"),
        (dict(quantization_config={"quant_method": "fp8", "activation_scheme": "static"}), "activation_scheme"),
        (dict(quantization_config={"quant_method": "fp8", "activation_scheme": "dynamic"}), "weight_block_size None"),
        (dict(use_sliding_window=True), "use_sliding_window"),
    ],
    ids=[
        "llama",
        "moe-arch-dense-type",
        "no-arch",
        "dynamic-ntk",
        "unknown-model-type",
        "awq",
        "fp8-static",
        "fp8-tensor",
        "sliding",
    ],
)
def test_unsupported_config_is_refused_by_name(tiny_model_dir, tmp_path, changes, match):
    d = _variant(tiny_model_dir, tmp_path / "ckpt", **changes)
    with pytest.raises(UnsupportedCheckpointError, match=match):
        EngineConfig(str(d), device="cpu")


def test_bin_only_checkpoint_is_refused(tiny_model_dir, tmp_path):
    d = _variant(tiny_model_dir, tmp_path / "ckpt", weights=False)
    (d / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UnsupportedCheckpointError, match=r"pytorch_model\.bin.*\*\.safetensors only"):
        EngineConfig(str(d), device="cpu")


def _load(d: Path) -> None:
    from nanovllmx.worker.worker import Worker

    Worker(EngineConfig(str(d), device="cpu", context_len=64))


def test_dense_config_with_moe_weights_is_refused(tiny_model_dir, tmp_path):
    # a Qwen3-MoE checkpoint whose config says dense: its expert tensors have no place in the model
    d = _variant(tiny_model_dir, tmp_path / "ckpt")
    (d / "model.safetensors").unlink()
    w = load_file(tiny_model_dir / "model.safetensors")
    w["model.layers.0.mlp.experts.0.gate_proj.weight"] = w.pop("model.layers.0.mlp.gate_proj.weight")
    save_file(w, d / "model.safetensors")
    with pytest.raises(UnsupportedCheckpointError, match=r"experts\.0\.gate_proj\.weight.*has no place"):
        _load(d)


def test_fp8_weights_without_quantization_config_are_refused(tiny_model_dir, tmp_path):
    d = _variant(tiny_model_dir, tmp_path / "ckpt")
    (d / "model.safetensors").unlink()
    w = load_file(tiny_model_dir / "model.safetensors")
    k = "model.layers.1.self_attn.o_proj.weight"
    w[k] = w[k].to(torch.float8_e4m3fn)
    w[k + "_scale_inv"] = torch.ones(1, 1)
    save_file(w, d / "model.safetensors")
    with pytest.raises(UnsupportedCheckpointError, match=r"o_proj\.weight is torch\.float8_e4m3fn.*no fp8"):
        _load(d)


def test_yarn_sets_the_context_default(tiny_model_dir, tmp_path):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}
    d = _variant(tiny_model_dir, tmp_path / "ckpt", rope_scaling=yarn, rope_parameters=None)
    cfg = EngineConfig(str(d), device="cpu")
    assert cfg.checkpoint.rope["rope_type"] == "yarn" and cfg.context_len == 8192  # 2048 x 4 > 4096
    assert EngineConfig(str(tiny_model_dir), device="cpu").context_len == 4096
    with pytest.raises(ValueError, match="context_len"):
        EngineConfig(str(d), device="cpu", context_len=8193)


def _dequant_loops(w8: torch.Tensor, s: torch.Tensor, b: int) -> torch.Tensor:
    out = torch.empty(w8.shape)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * b, (i + 1) * b), slice(j * b, (j + 1) * b)
            out[rows, cols] = w8[rows, cols].float() * s[i, j]
    return out


def test_fp8_block_helpers():
    from nanovllmx.layers.fp8 import quantize_block_fp8

    torch.manual_seed(0)
    w = torch.randn(300, 200) * torch.rand(300, 1) * 3  # rows of different scales, partial edge blocks
    q, s = quantize_block_fp8(w, Fp8Scheme())
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    deq = dequantize_block_fp8(q, s, Fp8Scheme())
    assert torch.equal(deq, _dequant_loops(q, s, 128))
    assert ((deq - w).norm() / w.norm()) < 0.04  # e4m3: 3 mantissa bits
    # quantizing the bf16-dequantized weights again gives the same FP8 values (the fast path's
    # round trip), scales within bf16 rounding
    q2, s2 = quantize_block_fp8(deq.to(torch.bfloat16), Fp8Scheme())
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    assert ((s2 / s) - 1).abs().max() < 2**-8
    with pytest.raises(ValueError, match="weight_scale_inv of shape"):
        dequantize_block_fp8(q, s[:, :1], Fp8Scheme())
