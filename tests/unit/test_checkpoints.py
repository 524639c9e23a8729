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
    from nanovllmx.layers.fp8 import quantize_block_fp8, quantize_with_scale

    torch.manual_seed(0)
    w = torch.randn(300, 200) * torch.rand(300, 1) * 3  # rows of different scales, partial edge blocks
    q, s = quantize_block_fp8(w, Fp8Scheme())
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    deq = dequantize_block_fp8(q, s, Fp8Scheme())
    assert torch.equal(deq, _dequant_loops(q, s, 128))
    assert ((deq - w).norm() / w.norm()) < 0.04  # e4m3: 3 mantissa bits
    # the fast path's round trip: the bf16-dequantized weights over the checkpoint's scales are its
    # FP8 values again, bit for bit
    q2 = quantize_with_scale(deq.to(torch.bfloat16), s, Fp8Scheme())
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    with pytest.raises(ValueError, match="weight_scale_inv of shape"):
        dequantize_block_fp8(q, s[:, :1], Fp8Scheme())


@pytest.fixture(scope="module")
def fp8_dirs(tmp_path_factory) -> dict[str, Path]:
    """FP8 checkpoints whose projections lie on the 128-grid at TP=2 (q 1 head of 128 a rank,
        the one KV head replicated, 256 intermediate rows a rank), and one that does not (320 rows of
    gate put up's first row mid-block; at TP=2, 160 a rank start rank 1 mid-block)."""
    from nanovllmx.utils.make_model import make_model

    kw = dict(preset="tiny", dtype="float32", device="cpu", fp8=True, hidden_size=256, num_hidden_layers=2)
    kw.update(num_attention_heads=2, num_key_value_heads=1, head_dim=128)
    root = tmp_path_factory.mktemp("fp8")
    return {
        "aligned": make_model(root / "aligned", intermediate_size=512, **kw),
        "off-grid": make_model(root / "off", intermediate_size=320, **kw),
    }


@pytest.mark.parametrize("tp_rank,tp_size", [(0, 1), (1, 2)])
def test_fp8_fast_path_holds_the_checkpoints_fp8_values(fp8_dirs, tp_rank, tp_size):
    """After load + quantize_model_fp8, each layer's FP8 weight and scales are exactly its shard of
    the checkpoint's (the rank-1 shard of a TP=2 grid built without the grid: loading needs no
    collective); layers whose shards are off the 128-grid keep the dequantized weights."""
    from nanovllmx.distributed.parallel_state import ParallelInfo, set_parallel_info
    from nanovllmx.layers.fp8 import quantize_model_fp8
    from nanovllmx.models.loader import load_weights
    from nanovllmx.models.registry import build_model

    cfg = EngineConfig(str(fp8_dirs["aligned"]), device="cpu")
    ckpt = load_file(fp8_dirs["aligned"] / "model.safetensors")
    set_parallel_info(ParallelInfo(tp_rank=tp_rank, tp_size=tp_size))
    try:
        model = build_model(cfg.hf_config)
        load_weights(model, cfg.model, fp8=cfg.checkpoint.fp8, keep_fp8_scales=True)
        assert quantize_model_fp8(model, cfg.checkpoint.fp8) == {"fp8": 8, "kept_dequantized": 0}
        off_cfg = EngineConfig(str(fp8_dirs["off-grid"]), device="cpu")
        off = build_model(off_cfg.hf_config)
        load_weights(off, off_cfg.model, fp8=off_cfg.checkpoint.fp8, keep_fp8_scales=True)
        counts = quantize_model_fp8(off, off_cfg.checkpoint.fp8)
    finally:
        set_parallel_info(ParallelInfo())
    # gate_up off the grid at both sizes; down (row-parallel: its input dim split) at TP=2 only
    assert counts == ({"fp8": 6, "kept_dequantized": 2} if tp_size == 1 else {"fp8": 4, "kept_dequantized": 4})
    assert off.layers["0"].mlp.gate_up_proj.fp8 is None and off.layers["0"].self_attn.o_proj.fp8 is not None

    def rows(name: str, n: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        w, s = ckpt[f"model.layers.1.{name}.weight"], ckpt[f"model.layers.1.{name}.weight_scale_inv"]
        return w[start : start + n], s[start // 128 : (start + n + 127) // 128]

    layer = model.layers["1"]
    r = tp_rank
    q, k, v = (
        rows("self_attn.q_proj", 128 * 2 // tp_size, r * 256 // tp_size),
        *(rows(f"self_attn.{p}_proj", 128, 0) for p in "kv"),
    )
    i = 512 // tp_size
    gate, up = rows("mlp.gate_proj", i, r * i), rows("mlp.up_proj", i, r * i)
    down_w, down_s = ckpt["model.layers.1.mlp.down_proj.weight"], ckpt["model.layers.1.mlp.down_proj.weight_scale_inv"]
    down = down_w[:, r * i : (r + 1) * i], down_s[:, r * i // 128 : (r + 1) * i // 128]
    for got, parts in [
        (layer.self_attn.qkv_proj.fp8, [q, k, v]),
        (layer.mlp.gate_up_proj.fp8, [gate, up]),
        (layer.mlp.down_proj.fp8, [down]),
    ]:
        want_w, want_s = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        assert torch.equal(got.weight.view(torch.uint8), want_w.contiguous().view(torch.uint8))
        assert torch.equal(got.scale_inv, want_s)


def test_fp8_copy_quantizes_the_same_weights(tiny_model_dir, tmp_path):
    from nanovllmx.utils.make_model import fp8_copy

    out = fp8_copy(tiny_model_dir, tmp_path / "fp8", device="cpu")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    src, dst = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    k = "model.layers.2.mlp.up_proj.weight"
    assert dst[k].dtype == torch.float8_e4m3fn and dst["model.embed_tokens.weight"].dtype == torch.float32
    deq = dequantize_block_fp8(dst[k], dst[k + "_scale_inv"], Fp8Scheme())
    assert ((deq - src[k]).norm() / src[k].norm()) < 0.04
    assert not (tmp_path / "fp8.tmp").exists()


def test_head_dim_flashinfer_cannot_run(tiny_model_dir):
    # the tiny preset's (and the demo's) head_dim is 32: FlashInfer would fail inside its prefill at
    # the first request. Asked for by name: refused; "auto": torch attention, eager
    with pytest.raises(UnsupportedCheckpointError, match="head_dim 32.*64, 128, 256"):
        EngineConfig(str(tiny_model_dir), device="cuda", attention_backend="flashinfer")
    cfg = EngineConfig(str(tiny_model_dir), device="cuda")
    assert cfg.attention_backend == "torch" and cfg.enforce_eager
