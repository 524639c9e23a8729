"""Tests for the random-weight Qwen3 checkpoint factory (nanovllmx.utils.make_model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanovllmx.utils.make_model import (
    DEMO_MODEL_NAME,
    PRESETS,
    QWEN3_ADDED_TOKENS,
    demo_model_path,
    make_model,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=0, device="cpu")


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(tiny_dir)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    assert files, f"no safetensors in {path}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


# --- tokenizer -------------------------------------------------------------------------------------


def test_tokenizer_is_fast_and_encodes_chatml_like_qwen3(tokenizer) -> None:
    assert tokenizer.is_fast
    assert tokenizer("<|im_start|>user\nHello<|im_end|>").input_ids == [151644, 872, 198, 9707, 151645]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 151645
    assert tokenizer.pad_token_id == 151643
    assert len(tokenizer) == 151669


def test_added_token_ids_and_specialness(tokenizer) -> None:
    for tid, content, _special in QWEN3_ADDED_TOKENS:
        assert tokenizer.convert_tokens_to_ids(content) == tid, content
        # Added tokens must be matched whole, never split by BPE.
        assert tokenizer(f"a{content}b", add_special_tokens=False).input_ids[1] == tid
    # <think>/<tool_call> are not special: skip_special_tokens keeps them, drops <|im_end|>.
    ids = tokenizer("<think>x</think><tool_call><|im_end|>").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>x</think><tool_call>"


@pytest.mark.parametrize("text", ["héllo 世界 🙂", "  leading spaces\n\ttabs\r\n", "naïve café 123456 👍🏽 العربية"])
def test_multibyte_round_trip(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert all(i < 151643 for i in ids)
    assert tokenizer.decode(ids) == text


def test_digits_split_one_by_one(tokenizer) -> None:
    # Qwen's pre-tokenizer uses \p{N} (single digits), unlike GPT-4's \p{N}{1,3}.
    ids = tokenizer("12345", add_special_tokens=False).input_ids
    assert [tokenizer.decode([i]) for i in ids] == list("12345")


# --- chat template ---------------------------------------------------------------------------------

CONV = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi there"},
]
EXPECTED = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"


def test_chat_template_two_messages(tokenizer) -> None:
    assert tokenizer.apply_chat_template(CONV, tokenize=False) == EXPECTED


def test_chat_template_generation_prompt_and_thinking_switch(tokenizer) -> None:
    gen = tokenizer.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True)
    assert gen == EXPECTED + "<|im_start|>assistant\n"
    on = tokenizer.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert on == gen
    off = tokenizer.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert off == EXPECTED + "<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_chat_template_tools_and_reasoning(tokenizer) -> None:
    conv = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "20C"},
        {"role": "tool", "content": "21C"},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nWarm."},
    ]
    out = tokenizer.apply_chat_template(conv, tokenize=False)
    assert out == (
        "<|im_start|>user\nWeather?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n20C\n</tool_response>\n<tool_response>\n21C\n</tool_response><|im_end|>\n"
        # Reasoning after the last user query is kept.
        "<|im_start|>assistant\n<think>\nhmm\n</think>\n\nWarm.<|im_end|>\n"
    )
    # Once a new user turn follows, earlier reasoning is dropped from the context.
    later = tokenizer.apply_chat_template(conv + [{"role": "user", "content": "ok"}], tokenize=False)
    assert "<think>" not in later and "<|im_start|>assistant\nWarm.<|im_end|>\n" in later


# --- checkpoint ------------------------------------------------------------------------------------


def test_checkpoint_files_and_configs(tiny_dir: Path) -> None:
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        assert (tiny_dir / name).is_file(), name
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["model_type"] == "qwen3"
    assert cfg["torch_dtype"] == "float32" and cfg["rope_theta"] == 1e6
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643] and gen["bos_token_id"] == 151643


def test_tiny_loads_in_transformers_with_preset_shape(tiny_dir: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    p = PRESETS["tiny"]
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (128, 256, 4)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (4, 2, 32, 151936)
    assert c.tie_word_embeddings and c.initializer_range == p["initializer_range"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.shape == (4 * 32, 128)
    assert abs(q.std().item() - p["initializer_range"]) < 0.02
    assert torch.all(model.model.layers[0].self_attn.q_norm.weight == 1)
    # Nothing was left uninitialised (to_empty garbage would show up as NaN/inf or huge values).
    for name, t in model.state_dict().items():
        assert torch.isfinite(t).all() and t.abs().max() < 10, name


def test_tiny_logits_are_not_flat(tiny_dir: Path) -> None:
    # The point of the larger init: argmax must not hinge on float noise.
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 151643, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        top2 = model(ids).logits.topk(2, dim=-1).values
    gap = top2[..., 0] - top2[..., 1]
    assert gap.median() > 0.05


def test_same_seed_same_weights_different_seed_different(tiny_dir: Path, tmp_path: Path) -> None:
    a = _weights(tiny_dir)
    b = _weights(make_model(tmp_path / "same", preset="tiny", seed=0, device="cpu"))
    c = _weights(make_model(tmp_path / "other", preset="tiny", seed=1, device="cpu"))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert not torch.equal(a["model.layers.3.mlp.down_proj.weight"], c["model.layers.3.mlp.down_proj.weight"])


def test_bfloat16_is_rounded_float32(tiny_dir: Path, tmp_path: Path) -> None:
    a = _weights(tiny_dir)
    b = _weights(make_model(tmp_path / "bf16", preset="tiny", seed=0, dtype="bfloat16", device="cpu"))
    k = "model.layers.0.mlp.up_proj.weight"
    assert b[k].dtype == torch.bfloat16 and torch.equal(a[k].to(torch.bfloat16), b[k])
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_unknown_preset_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_model(tmp_path, preset="nope")


# --- demo model cache ------------------------------------------------------------------------------


def test_demo_model_path_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOVLLMX_CACHE", str(tmp_path))
    p1 = demo_model_path()
    assert p1 == tmp_path / DEMO_MODEL_NAME
    assert "random" in (p1 / "README.md").read_text().lower()
    assert (p1 / "config.json").is_file() and list(p1.glob("*.safetensors"))
    mtime = (p1 / "config.json").stat().st_mtime_ns
    p2 = demo_model_path()
    assert p2 == p1 and (p1 / "config.json").stat().st_mtime_ns == mtime
    # No temp dirs are left behind in the cache root.
    assert sorted(x.name for x in tmp_path.iterdir()) == [DEMO_MODEL_NAME]
