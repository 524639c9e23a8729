"""Which model class serves a checkpoint: by its (already validated) architecture."""

from __future__ import annotations

from typing import Any

from nanovllmx.errors import UnsupportedCheckpointError
from nanovllmx.models.checkpoint import SUPPORTED_ARCHITECTURES
from nanovllmx.models.qwen3 import Qwen3ForCausalLM
from nanovllmx.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_CLASSES: dict[str, type[Qwen3ForCausalLM]] = {
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}
assert set(MODEL_CLASSES) == set(SUPPORTED_ARCHITECTURES)


def build_model(hf_config: Any) -> Qwen3ForCausalLM:
    """This process's model (its pipeline stage, its TP shard), weights not loaded yet."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if len(archs) != 1 or archs[0] not in MODEL_CLASSES:
        raise UnsupportedCheckpointError(f"unsupported architectures {archs}; supported: {sorted(MODEL_CLASSES)}")
    return MODEL_CLASSES[archs[0]](hf_config)
