"""benchmarks/roofline.py: the standard workload's bound from a checkpoint's config.json."""

import json

import pytest

from benchmarks.roofline import Shape, bound, workload

# config.json fields of the two shapes (as nanovllmx.utils.make_model's presets write them)
QWEN3_06B = dict(
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    tie_word_embeddings=True,
)
QWEN3_8B = dict(
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    tie_word_embeddings=False,
)


def _checkpoint(tmp_path, name, config):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3", **config}))
    return d


def test_standard_workload():
    p, o = workload()
    assert (len(p), sum(p), sum(o), max(o)) == (256, 142827, 133966, 1024)


@pytest.mark.parametrize(
    "name, config, expected, serial",
    [
        ("q06", QWEN3_06B, 37_561, 35_818),  # docs/benchmarks.md: 37.6k tok/s at 4.24 TB/s
        ("q8b", QWEN3_8B, 17_020, 12_857),  # ~17.0k; prefill's 2.5 s of compute does not hide under decode
    ],
)
def test_bound_from_config(tmp_path, name, config, expected, serial):
    shape = Shape.from_config(_checkpoint(tmp_path, name, config))
    b = bound(shape, bw=4.24e12)
    assert b.output_tokens == 133966
    assert b.tok_per_s == pytest.approx(expected, rel=0.01)
    assert b.t_mem > b.t_compute  # memory-bound at 790 TF/s
    # prefill's compute and decode's bytes one after the other: longer by exactly prefill's compute
    assert b.serial_tok_per_s == pytest.approx(serial, rel=0.01)
    t_prefill = b.t_compute * b.prefill_flops / (b.prefill_flops + b.decode_flops)
    assert b.serial_seconds - b.seconds == pytest.approx(t_prefill)


def test_defaults_are_the_06b_shape(tmp_path):
    assert Shape() == Shape.from_config(_checkpoint(tmp_path, "q06", QWEN3_06B))
    assert Shape().params == pytest.approx(0.596e9, rel=0.01)
    assert Shape.from_config(_checkpoint(tmp_path, "q8b", QWEN3_8B)).params == pytest.approx(8.19e9, rel=0.01)


def test_bandwidth_scales_the_bound():
    # memory-bound: the bound is linear in the copy bandwidth (the H100's ~3.0 TB/s: 26.6k tok/s)
    assert bound(bw=3.0e12).tok_per_s == pytest.approx(26_576, rel=1e-3)
    assert bound(bw=3.0e12).tok_per_s == pytest.approx(bound(bw=4.24e12).tok_per_s * 3.0 / 4.24, rel=1e-9)


def test_moe_bound_counts_active_parameters(tmp_path):
    # Qwen3-30B-A3B's published sizes: 30.5B parameters, 3.3B activated
    cfg = dict(
        model_type="qwen3_moe",
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=False,
    )
    shape = Shape.from_config(_checkpoint(tmp_path, "a3b", cfg))
    assert shape.params / 1e9 == pytest.approx(30.5, abs=0.1)
    assert shape.active_params / 1e9 == pytest.approx(3.3, abs=0.1)
    # a dense layer among them (mlp_only_layers) uses `intermediate_size`
    one_dense = Shape.from_config(_checkpoint(tmp_path, "a3b-dense0", {**cfg, "mlp_only_layers": [0]}))
    assert one_dense.sparse_layers == 47
    moe_layer_mlp = 128 * 2048 + 8 * 3 * 2048 * 768  # router + 8 experts
    assert one_dense.active_params - shape.active_params == 3 * 2048 * 6144 - moe_layer_mlp
    b, dense_equiv = bound(shape, bw=4.24e12), bound(Shape(**{**shape.__dict__, "top_k": 128}), bw=4.24e12)
    assert b.weight_bytes < dense_equiv.weight_bytes / 5  # active: 8 of 128 experts


def test_fp8_weights_count_one_byte(tmp_path):
    q8 = Shape.from_config(_checkpoint(tmp_path, "q8b", QWEN3_8B))
    f8 = Shape.from_config(
        _checkpoint(tmp_path, "q8b-fp8", {**QWEN3_8B, "quantization_config": {"quant_method": "fp8"}})
    )
    assert f8.fp8 and not q8.fp8
    head = 2 * QWEN3_8B["vocab_size"] * QWEN3_8B["hidden_size"]
    per_step_bf16, per_step_fp8 = (bound(s).weight_bytes / bound(s).decode_steps for s in (q8, f8))
    assert per_step_fp8 - head == pytest.approx((per_step_bf16 - head) / 2, rel=1e-3)
