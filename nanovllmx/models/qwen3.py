"""Qwen3 (dense) written with our tensor-parallel layers. A model instance may hold only a
contiguous range of decoder layers (one pipeline stage); the first stage embeds, the last one
norms and owns the LM head."""

from __future__ import annotations

import torch
from torch import nn

from nanovllmx.distributed.parallel_state import get_parallel_info
from nanovllmx.layers.activation import SiluAndMul
from nanovllmx.layers.attention import Attention
from nanovllmx.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from nanovllmx.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from nanovllmx.layers.norm import RMSNorm
from nanovllmx.layers.rotary import RotaryEmbedding
from nanovllmx.models.checkpoint import max_positions, rope_parameters


def make_rotary(cfg) -> RotaryEmbedding:
    """The model's rotary table (positions up to the longest supported context), one for all layers."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = rope_parameters(cfg)
    return RotaryEmbedding(head_dim, max_positions(cfg), rope["rope_theta"], rope)


class Qwen3Attention(nn.Module):
    def __init__(self, cfg, layer_id: int, rotary: RotaryEmbedding | None = None):
        super().__init__()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size,
            head_dim,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            bias=getattr(cfg, "attention_bias", False),
        )
        self.num_heads, self.num_kv_heads, self.head_dim = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * head_dim, cfg.hidden_size, bias=getattr(cfg, "attention_bias", False)
        )
        # shared by the layers: at 128K positions (YaRN) a table is 64 MB
        self.rotary_emb = rotary if rotary is not None else make_rotary(cfg)
        self.q_norm = RMSNorm(head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, cfg.rms_norm_eps)
        self.attn = Attention(self.num_heads, self.num_kv_heads, head_dim, head_dim**-0.5, layer_id)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        o = self.attn.forward_qkv(self.qkv_proj(x), positions, self.q_norm, self.k_norm, self.rotary_emb)
        return self.o_proj(o)


class Qwen3MLP(nn.Module):
    def __init__(self, cfg, intermediate_size: int | None = None):
        super().__init__()
        inter = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [inter] * 2)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_id: int, mlp: nn.Module, rotary: RotaryEmbedding | None = None):
        super().__init__()
        self.self_attn = Qwen3Attention(cfg, layer_id, rotary)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, hidden, residual):
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


def stage_layer_range(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """Contiguous layer range of a pipeline stage; earlier stages take the remainder."""
    base, rem = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, rem)
    return start, start + base + (1 if pp_rank < rem else 0)


class Qwen3ForCausalLM(nn.Module):
    # checkpoint name -> (our fused parameter, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg, layer_range: tuple[int, int] | None = None):
        super().__init__()
        info = get_parallel_info()
        self.cfg = cfg
        self.start_layer, self.end_layer = layer_range or stage_layer_range(
            cfg.num_hidden_layers, info.pp_rank, info.pp_size
        )
        self.is_first = self.start_layer == 0
        self.is_last = self.end_layer == cfg.num_hidden_layers
        self.tie = bool(getattr(cfg, "tie_word_embeddings", False))
        if self.is_first:
            self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        # local layer ids index the KV pool, global ids name checkpoint tensors
        rotary = make_rotary(cfg)
        self.layers = nn.ModuleDict(
            {
                str(i): Qwen3DecoderLayer(cfg, i - self.start_layer, self.make_mlp(cfg, i), rotary)
                for i in range(self.start_layer, self.end_layer)
            }
        )
        if self.is_last:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)

    def make_mlp(self, cfg, layer_idx: int) -> nn.Module:
        """The feed-forward block of global layer layer_idx (the MoE model overrides this)."""
        return Qwen3MLP(cfg)

    @property
    def num_local_layers(self) -> int:
        return self.end_layer - self.start_layer

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        hidden: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ):
        """First stage takes input_ids; later stages take (hidden, residual) from the previous one.
        Returns the final normed hidden states on the last stage, else (hidden, residual)."""
        if self.is_first:
            hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers.values():
            hidden, residual = layer(positions, hidden, residual)
        if self.is_last:
            hidden, _ = self.norm(hidden, residual)
            return hidden
        return hidden, residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def checkpoint_param_name(self, name: str) -> tuple[str, object] | None:
        """Map a checkpoint tensor name to (our parameter name, shard id), or None if this stage
        does not hold it."""
        if name.startswith("model."):
            name = name[len("model.") :]
        if name.startswith("layers."):
            idx = int(name.split(".")[1])
            if not self.start_layer <= idx < self.end_layer:
                return None
        elif name.startswith("embed_tokens."):
            if not self.is_first:
                return None
        elif name.startswith("norm."):
            if not self.is_last:
                return None
        elif name.startswith("lm_head."):
            if not self.is_last or self.tie:
                return None
        for ckpt, (ours, shard) in self.packed_modules.items():
            if f".{ckpt}." in name:
                return name.replace(f".{ckpt}.", f".{ours}."), shard
        return name, None
