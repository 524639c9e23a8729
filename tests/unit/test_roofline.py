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
    "name, config, expected",
    [
        ("q06", QWEN3_06B, 37_561),  # docs/benchmarks.md: 37.6k tok/s at 4.24 TB/s
        ("q8b", QWEN3_8B, 17_020),  # ~17.0k
    ],
)
def test_bound_from_config(tmp_path, name, config, expected):
    shape = Shape.from_config(_checkpoint(tmp_path, name, config))
    b = bound(shape, bw=4.24e12)
    assert b.output_tokens == 133966
    assert b.tok_per_s == pytest.approx(expected, rel=0.01)
    assert b.t_mem > b.t_compute  # memory-bound at 790 TF/s


def test_defaults_are_the_06b_shape(tmp_path):
    assert Shape() == Shape.from_config(_checkpoint(tmp_path, "q06", QWEN3_06B))
    assert Shape().params == pytest.approx(0.596e9, rel=0.01)
    assert Shape.from_config(_checkpoint(tmp_path, "q8b", QWEN3_8B)).params == pytest.approx(8.19e9, rel=0.01)


def test_bandwidth_scales_the_bound():
    # memory-bound: the bound is linear in the copy bandwidth (the H100's ~3.0 TB/s: 26.6k tok/s)
    assert bound(bw=3.0e12).tok_per_s == pytest.approx(26_576, rel=1e-3)
    assert bound(bw=3.0e12).tok_per_s == pytest.approx(bound(bw=4.24e12).tok_per_s * 3.0 / 4.24, rel=1e-9)
