"""The other Qwen3 checkpoints against a reference, greedy token for token through the offline LLM
(CPU, float32): Qwen3-MoE against transformers' Qwen3MoeForCausalLM; a YaRN config against
transformers on prompts past original_max_position_embeddings (and differing from the same
weights without YaRN); an FP8 checkpoint (e4m3, 128 x 128 block scales) against the same weights
dequantized into a plain checkpoint. TP=2 / PP=2 MoE grids: tests/distributed/test_moe_grid.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovllmx import LLM, SamplingParams
from tests.helpers import random_prompt

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def _engine_greedy(path: Path, prompts: list[list[int]], **kw) -> list[list[int]]:
    llm = LLM(str(path), device="cpu", **kw)
    try:
        return [o.token_ids for o in llm.generate(prompts, GREEDY)]
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> Path:
    from nanovllmx.utils.make_model import make_model

    return make_model(tmp_path_factory.mktemp("tiny-moe"), preset="tiny-moe", seed=0, dtype="float32", device="cpu")


def test_moe_matches_transformers(moe_dir):
    from transformers import Qwen3MoeForCausalLM

    hf = Qwen3MoeForCausalLM.from_pretrained(moe_dir, dtype=torch.float32, attn_implementation="eager").eval()
    assert hf.model.layers[0].mlp.__class__.__name__ == "Qwen3MoeSparseMoeBlock"
    assert hf.model.layers[2].mlp.__class__.__name__ == "Qwen3MoeMLP"  # mlp_only_layers
    prompts = [random_prompt(n, seed) for n, seed in [(3, 1), (40, 2), (90, 4)]]
    # a small prefill budget: chunked prefill through the experts too
    got = _engine_greedy(moe_dir, prompts, context_len=256, max_num_batched_tokens=48)
    assert got == [_hf_greedy(hf, p, GREEDY.max_tokens) for p in prompts]


def test_yarn_matches_transformers(tiny_model_dir, tmp_path):
    from transformers import Qwen3ForCausalLM

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    d = tmp_path / "yarn"
    d.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name != "config.json":
            (d / f.name).symlink_to(f)
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(rope_scaling=yarn, max_position_embeddings=128)
    (d / "config.json").write_text(json.dumps(cfg))
    hf = Qwen3ForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    assert hf.config.rope_parameters["rope_type"] == "yarn"
    prompts = [random_prompt(n, 10 + n) for n in (20, 100, 150)]  # two start past 64 positions
    got = _engine_greedy(d, prompts)  # context_len defaults to 64 x 4 = 256
    assert got == [_hf_greedy(hf, p, GREEDY.max_tokens) for p in prompts]
    plain = _engine_greedy(tiny_model_dir, prompts[1:], context_len=256)
    assert plain != got[1:], "YaRN changed nothing"


def test_fp8_matches_its_dequantized_weights(tmp_path):
    from nanovllmx.utils.make_model import make_model

    # hidden 256 / intermediate 384: full and partial 128-blocks
    kw = dict(preset="tiny", seed=3, dtype="float32", device="cpu", hidden_size=256, intermediate_size=384)
    fp8 = make_model(tmp_path / "fp8", fp8=True, **kw)
    cfg = json.loads((fp8 / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    w = load_file(fp8 / "model.safetensors")
    q, s = w["model.layers.0.mlp.down_proj.weight"], w["model.layers.0.mlp.down_proj.weight_scale_inv"]
    assert q.dtype == torch.float8_e4m3fn and q.shape == (256, 384) and s.shape == (2, 3)
    assert w["model.embed_tokens.weight"].dtype == torch.float32
    # the reference: each block times its scale, written as a plain float32 checkpoint
    plain = {}
    for name, t in w.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            sc = w[name + "_scale_inv"]
            big = torch.kron(sc, torch.ones(128, 128))[: t.shape[0], : t.shape[1]]
            t = t.float() * big
        plain[name] = t
    ref = tmp_path / "dequantized"
    ref.mkdir()
    for f in fp8.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            (ref / f.name).symlink_to(f)
    save_file(plain, ref / "model.safetensors")
    cfg.pop("quantization_config")
    (ref / "config.json").write_text(json.dumps(cfg))
    prompts = [random_prompt(n, 20 + n) for n in (5, 33)]
    assert _engine_greedy(fp8, prompts, context_len=128) == _engine_greedy(ref, prompts, context_len=128)
