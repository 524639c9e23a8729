"""Lower bound on the time of the standard throughput workload (bench.py: 256 requests, prompt and
output lengths uniform in 100..1024 with random.seed(0), 133,966 output tokens) for a Qwen3-style
model on one GPU, from the bytes it must move and the FLOPs it must do. The model's shape comes
from its checkpoint's config.json, so the same bench gives the bound of the 0.6B and 8B shapes.

    python -m benchmarks.roofline --model /tmp/q06                 # at 4.24 TB/s (an H200's copy bandwidth)
    python -m benchmarks.roofline --model /tmp/q8b --bw 3.0e12     # at another copy bandwidth
    python -m benchmarks.roofline --bw 3.0e12                      # no --model: the Qwen3-0.6B shape

Decode: every step reads all weights once (the layers and the LM head; the embedding is only
gathered) and the whole KV cache of the running requests once. Prefill: every prompt token costs
2*params FLOPs plus causal attention. Sampling and the CPU are free here, so a real engine can only
be slower. `bench.py --bw` measures the copy bandwidth and reports its run against this bound.
(Moved here from the project's shared roofline.py, with the same arithmetic: Qwen3-0.6B at
4.24 TB/s gives 37,561 tok/s, Qwen3-8B 17,020.)

Qwen3-MoE: the bound counts the *active* parameters (attention, the router, top_k of the experts
of each sparse layer, the dense MLP of the others, the LM head): the weights a step would read if
it read only the experts its tokens use, and the FLOPs a token costs. With a batch of 256 tokens
and top-8 of 128 experts nearly every expert is used every step, so the real bytes are closer to
all parameters: the active-parameter bound is optimistic, the one the issue asks to report.
FP8 checkpoints (a quantization_config): the projections' weights count 1 byte per parameter
(plus their block scales), the embedding and LM head their dtype's 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from dataclasses import dataclass
from random import randint, seed

H200_COPY_BW = 4.24e12  # bytes read + written per second of a large device copy, measured on an H200
H200_BF16_FLOPS = 7.9e14  # dense bf16 matmul FLOP/s (about the same on the H100 and H200)


@dataclass(frozen=True)
class Shape:
    """What the bound needs of a Qwen3-style checkpoint (the defaults: Qwen3-0.6B)."""

    layers: int = 28
    hidden: int = 1024
    inter: int = 3072
    heads: int = 16
    kv_heads: int = 8
    head_dim: int = 128
    vocab: int = 151936
    tie_word_embeddings: bool = True
    # Qwen3-MoE (experts 0: dense)
    experts: int = 0
    top_k: int = 0
    moe_inter: int = 0
    sparse_layers: int = 0  # layers with routed experts; the others have a dense MLP of `inter`
    fp8: bool = False  # projections stored as FP8 with 128 x 128 block scales

    @classmethod
    def from_config(cls, model: str | os.PathLike[str]) -> Shape:
        """The shape from `model`/config.json (a checkpoint directory), a config.json path, or
        else a hub id (through transformers' AutoConfig and its cache)."""
        path = os.path.join(model, "config.json") if os.path.isdir(model) else model
        if os.path.isfile(path):
            with open(path) as f:
                c = json.load(f)
        else:
            from transformers import AutoConfig

            c = AutoConfig.from_pretrained(model).to_dict()
        # transformers 5 writes num_local_experts, Qwen's own configs num_experts
        n_exp = c.get("num_experts") or c.get("num_local_experts") or 0
        experts = int(n_exp) if c.get("model_type") == "qwen3_moe" else 0
        sparse = 0
        if experts:
            only, step = set(c.get("mlp_only_layers") or []), int(c.get("decoder_sparse_step") or 1)
            sparse = sum(1 for i in range(c["num_hidden_layers"]) if i not in only and (i + 1) % step == 0)
        return cls(
            experts=experts,
            top_k=int(c.get("num_experts_per_tok") or 0) if experts else 0,
            moe_inter=int(c.get("moe_intermediate_size") or 0) if experts else 0,
            sparse_layers=sparse,
            fp8=(c.get("quantization_config") or {}).get("quant_method") == "fp8",
            layers=c["num_hidden_layers"],
            hidden=c["hidden_size"],
            inter=c["intermediate_size"],
            heads=c["num_attention_heads"],
            kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
            head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
            vocab=c["vocab_size"],
            tie_word_embeddings=c.get("tie_word_embeddings", False),
        )

    @property
    def attn_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.hidden * (q + 2 * kv) + q * self.hidden

    @property
    def layer_params(self) -> int:
        """Parameters of a dense layer (all of them, every layer of a dense model)."""
        return self.attn_params + 3 * self.hidden * self.inter

    def _body(self, experts_per_layer: int) -> int:
        dense = self.layers - self.sparse_layers
        moe = self.attn_params + self.experts * self.hidden + experts_per_layer * 3 * self.hidden * self.moe_inter
        return dense * self.layer_params + self.sparse_layers * moe

    @property
    def body_params(self) -> int:
        """Parameters of the decoder layers (norms left out)."""
        return self._body(self.experts)

    @property
    def active_body_params(self) -> int:
        """Parameters of the decoder layers that one token uses (top_k experts per sparse layer)."""
        return self._body(self.top_k)

    @property
    def params(self) -> int:
        """Parameters in the checkpoint (norms left out): the layers, the LM head, and the embedding
        when it is not tied to the head."""
        head = self.vocab * self.hidden
        return self.body_params + head * (1 if self.tie_word_embeddings else 2)

    def step_weight_bytes(self, dtype_bytes: int = 2) -> float:
        """Bytes one decode step reads of weights: the layers' active parameters once (FP8 with a
        float32 scale per 128 x 128 block where `fp8`) and the LM head in `dtype_bytes`."""
        body_bytes = (1 + 4 / (128 * 128)) if self.fp8 else dtype_bytes
        return self.active_body_params * body_bytes + self.vocab * self.hidden * dtype_bytes

    def kv_token_bytes(self, kv_bytes: int = 2) -> int:
        """Bytes of one token's K and V in every layer's cache (`kv_bytes` per element, 1 for fp8)."""
        return self.layers * 2 * self.kv_heads * self.head_dim * kv_bytes

    @property
    def active_params(self) -> int:
        """`params` with only the top_k experts of each sparse layer (as Qwen counts "activated")."""
        head = self.vocab * self.hidden
        return self.active_body_params + head * (1 if self.tie_word_embeddings else 2)


def workload(n: int = 256, max_in: int = 1024, max_out: int = 1024) -> tuple[list[int], list[int]]:
    """Prompt and output lengths of bench.py's standard workload (same draw order: each prompt's
    length, then its tokens; then the output lengths)."""
    seed(0)
    prompts = []
    for _ in range(n):
        length = randint(100, max_in)
        for _ in range(length):
            randint(0, 10000)
        prompts.append(length)
    outputs = [randint(100, max_out) for _ in range(n)]
    return prompts, outputs


@dataclass(frozen=True)
class Bound:
    prompt_tokens: int
    output_tokens: int
    decode_steps: int
    weight_bytes: float
    kv_read_bytes: float
    kv_write_bytes: float
    t_mem: float
    prefill_flops: float
    decode_flops: float
    t_compute: float

    @property
    def seconds(self) -> float:
        return max(self.t_mem, self.t_compute)

    @property
    def tok_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def serial_seconds(self) -> float:
        """Prefill's FLOPs, then decode's bytes, one after the other. The bound above overlaps the
        two entirely, but one GPU runs a prefill chunk's compute-bound GEMMs in place of decode
        steps, not beside them (only the decode tokens riding in the few mixed steps get their
        weight reads free). Small for the 0.6B shape (its prefill is ~0.2 s), not for the 8B one:
        7.8 s -> 10.4 s at 4.24 TB/s, 76% of the bound's tok/s."""
        return self.t_compute * self.prefill_flops / (self.prefill_flops + self.decode_flops) + self.t_mem

    @property
    def serial_tok_per_s(self) -> float:
        return self.output_tokens / self.serial_seconds


def bound(
    shape: Shape = Shape(),
    bw: float = H200_COPY_BW,
    flops: float = H200_BF16_FLOPS,
    num_seqs: int = 256,
    dtype_bytes: int = 2,
    kv_bytes: int = 2,
) -> Bound:
    """The standard workload's lower bound on `shape` at copy bandwidth `bw` (bytes/s) and matmul
    rate `flops`. kv_bytes: bytes per KV element (1 for fp8)."""
    p, o = workload(num_seqs)
    q = shape.heads * shape.head_dim
    body = shape.active_body_params  # all of them for a dense model
    head = shape.vocab * shape.hidden
    kv_tok = shape.kv_token_bytes(kv_bytes)
    steps = max(o)
    # decode: weights once per step, KV of every live request once per step
    w_bytes = steps * shape.step_weight_bytes(dtype_bytes)
    kv_read = sum(oi * pi + oi * (oi - 1) // 2 for pi, oi in zip(p, o)) * kv_tok
    kv_write = (sum(p) + sum(o)) * kv_tok
    # prefill: linear layers for every prompt token, causal attention, lm_head for the last token
    attn = sum(4 * shape.layers * q * pi * pi / 2 for pi in p)
    f_pre = 2 * body * sum(p) + attn + 2 * head * len(p)
    f_dec = 2 * (body + head) * sum(o)
    return Bound(
        prompt_tokens=sum(p),
        output_tokens=sum(o),
        decode_steps=steps,
        weight_bytes=w_bytes,
        kv_read_bytes=kv_read,
        kv_write_bytes=kv_write,
        t_mem=(w_bytes + kv_read + kv_write) / bw,
        prefill_flops=f_pre,
        decode_flops=f_dec,
        t_compute=(f_pre + f_dec) / flops,
    )


def copy_bandwidth() -> float:
    """Device memory bandwidth (bytes read + written per second) of a large copy on the current GPU."""
    import torch

    from nanovllmx.utils.profiling import cuda_time

    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    bw = 2 * n / cuda_time(functools.partial(b.copy_, a), iters=20)
    del a, b
    torch.cuda.empty_cache()
    return bw


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (its config.json); default: Qwen3-0.6B")
    ap.add_argument("--bw", type=float, default=H200_COPY_BW, help="device copy bandwidth, bytes/s (read+write)")
    ap.add_argument("--flops", type=float, default=H200_BF16_FLOPS, help="bf16 matmul FLOP/s")
    ap.add_argument("--num-seqs", type=int, default=256, help="requests of the standard workload")
    ap.add_argument("--kv-bytes", type=int, default=2, help="bytes per KV element (1 for fp8)")
    a = ap.parse_args(argv)
    shape = Shape.from_config(a.model) if a.model else Shape()
    b = bound(shape, a.bw, a.flops, a.num_seqs, kv_bytes=a.kv_bytes)
    active = f", {shape.active_params / 1e9:.2f}B active" if shape.experts else ""
    print(f"shape: {shape} ({shape.params / 1e9:.2f}B parameters{active})")
    print(
        f"requests={a.num_seqs} prompt_tokens={b.prompt_tokens} output_tokens={b.output_tokens} "
        f"decode_steps>={b.decode_steps}"
    )
    print(
        f"bytes: weights {b.weight_bytes / 1e12:.2f} TB, kv read {b.kv_read_bytes / 1e12:.2f} TB, "
        f"kv write {b.kv_write_bytes / 1e9:.1f} GB -> {b.t_mem:.2f} s at {a.bw / 1e12:.2f} TB/s"
    )
    print(
        f"flops: prefill {b.prefill_flops / 1e12:.0f} TF, decode {b.decode_flops / 1e12:.0f} TF "
        f"-> {b.t_compute:.2f} s at {a.flops / 1e12:.0f} TF/s"
    )
    print(f"bound {b.seconds:.2f} s = {b.tok_per_s:.0f} output tok/s")
    print(f"prefill compute, then decode memory: {b.serial_seconds:.2f} s = {b.serial_tok_per_s:.0f} output tok/s")


if __name__ == "__main__":
    main()
