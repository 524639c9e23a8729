"""Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3 whose feed-forward blocks are routed experts, except in
`mlp_only_layers` and in layers off the `decoder_sparse_step` grid, which keep a dense MLP.
Everything else (attention, pipeline stages, tensor-parallel layers, the loader) is Qwen3's."""

from __future__ import annotations

import re

import torch
from torch import nn

from nanovllmx.layers.linear import ReplicatedLinear
from nanovllmx.layers.moe import FusedMoE
from nanovllmx.models.qwen3 import Qwen3ForCausalLM, Qwen3MLP

_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.")


def is_sparse_layer(cfg, layer_idx: int) -> bool:
    """transformers' rule: experts unless the layer is MLP-only or off the sparse step."""
    return (
        layer_idx not in (getattr(cfg, "mlp_only_layers", None) or [])
        and cfg.num_experts > 0
        and (layer_idx + 1) % cfg.decoder_sparse_step == 0
    )


class Qwen3MoeSparseMoeBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate = ReplicatedLinear(cfg.hidden_size, cfg.num_experts)
        self.experts = FusedMoE(
            cfg.num_experts,
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            cfg.num_experts_per_tok,
            bool(cfg.norm_topk_prob),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.gate(x))


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    def make_mlp(self, cfg, layer_idx: int) -> nn.Module:
        return Qwen3MoeSparseMoeBlock(cfg) if is_sparse_layer(cfg, layer_idx) else Qwen3MLP(cfg)

    def checkpoint_param_name(self, name: str) -> tuple[str, object] | None:
        m = _EXPERT.search(name)
        if m is None:
            return super().checkpoint_param_name(name)
        mapped = super().checkpoint_param_name(name[: m.start()] + ".mlp.experts.w.weight")
        if mapped is None:  # another stage's layer
            return None
        prefix = mapped[0][: -len(".w.weight")]
        param = "w2" if m.group(2) == "down" else "w13"
        return f"{prefix}.{param}", (int(m.group(1)), m.group(2))
