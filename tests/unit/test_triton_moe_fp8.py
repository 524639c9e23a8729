"""The MoE and FP8 Triton kernels (kernels/fused_moe.py, kernels/fp8_linear.py) on the CPU through
Triton's interpreter (as tests/unit/test_triton_interpreted.py), against the PyTorch reference
paths: the expert grouping, the grouped expert GEMMs (bf16/fp16/fp32 weights and FP8 block-scaled
ones) and the FP8 linear through the layers after quantize_model_fp8. The interpreter computes
tl.dot wrongly on bfloat16 inputs, so activations here are float32 and float16;
tests/gpu/test_moe_fp8.py runs the same comparisons compiled, in bfloat16, on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

CHECKS = textwrap.dedent("""
    import torch
    torch.manual_seed(0)
    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    from nanovllmx.kernels.fused_moe import align_block_size, fused_experts
    from nanovllmx.layers.moe import experts_reference, route
    from nanovllmx.layers.fp8 import Fp8Experts, quantize_block_fp8
    from nanovllmx.models.checkpoint import Fp8Scheme
    from nanovllmx.models.loader import dequantize_block_fp8

    # ---- grouping: every (token, slot) pair once, in its expert's tiles, the rest padding
    E, BM = 6, 4
    ids = torch.tensor([[5, 0], [0, 2], [5, 0], [3, 5], [0, 1]])
    sorted_ids, blocks, n_pad = align_block_size(ids, E, BM)
    n, flat = ids.numel(), ids.flatten()
    used = sorted_ids[: int(n_pad)]
    assert sorted(used[used < n].tolist()) == list(range(n)), "each pair once"
    assert int(n_pad) == sum(-(-int((flat == e).sum()) // BM) * BM for e in range(E)), "padded length"
    for i, p in enumerate(used.tolist()):
        if p < n:
            assert flat[p] == blocks[i // BM], ("pair in its expert's tile", i, p)
    assert (sorted_ids[int(n_pad):] == n).all()

    # ---- grouped GEMMs against the per-expert reference; experts without tokens, T = 0 and 1
    for dt in (torch.float32, torch.float16):
        for T, E, k in [(0, 4, 2), (1, 8, 2), (37, 8, 3), (9, 16, 2)]:
            H, I = 64, 48
            x = torch.randn(T, H).to(dt)
            w13, w2 = (torch.randn(E, 2 * I, H) * 0.2).to(dt), (torch.randn(E, H, I) * 0.2).to(dt)
            w, ids = route(torch.randn(T, E).to(dt), k, renormalize=(k == 2))
            out, ref = fused_experts(x, w13, w2, w, ids), experts_reference(x, w13, w2, w, ids)
            assert out.shape == (T, H) and out.dtype == dt
            if T:
                assert rel(out, ref) < (1e-5 if dt == torch.float32 else 3e-3), (dt, T, rel(out, ref))

    # ---- FP8 experts (block 128 x 128 over 256 x 192 / 128 x 256 weights; partial blocks) against
    # the reference on the dequantized weights
    b = Fp8Scheme()
    E, H, I, T, k = 4, 192, 128, 21, 2
    w13, w2 = torch.randn(E, 2 * I, H) * 0.1, torch.randn(E, H, I) * 0.1
    q13, s13 = zip(*(quantize_block_fp8(w13[e], b) for e in range(E)))
    q2, s2 = zip(*(quantize_block_fp8(w2[e], b) for e in range(E)))
    fp8 = Fp8Experts(torch.stack(q13), torch.stack(s13), torch.stack(q2), torch.stack(s2), (128, 128))
    d13 = torch.stack([dequantize_block_fp8(q13[e], s13[e], b) for e in range(E)])
    d2 = torch.stack([dequantize_block_fp8(q2[e], s2[e], b) for e in range(E)])
    x = torch.randn(T, H).half()
    w, ids = route(torch.randn(T, E), k, True)
    out = fused_experts(x, torch.empty(0), torch.empty(0), w.half(), ids, fp8=fp8)
    ref = experts_reference(x.float(), d13, d2, w, ids)
    assert rel(out, ref) < 3e-3, ("fp8 experts", rel(out, ref))

    # ---- the layers after loading FP8 tensors (dequantized weights + their block scales, as the
    # loader does) and quantize_model_fp8: the FP8 MLP (merged gate/up, row-parallel down with a
    # bias) gives the dequantized MLP's output; a layer off the block grid keeps its weights
    from torch import nn
    from nanovllmx.layers.fp8 import load_block_scale, quantize_model_fp8
    from nanovllmx.layers.linear import MergedColumnParallelLinear, RowParallelLinear
    class MLP(nn.Module):
        def __init__(self, h, i):
            super().__init__()
            self.gate_up_proj = MergedColumnParallelLinear(h, [i, i])
            self.down_proj = RowParallelLinear(i, h, bias=True)
        def forward(self, x):
            g, u = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(torch.nn.functional.silu(g) * u)
    for h, i, expect in [(200, 256, 2), (128, 200, 1)]:  # 200 gate rows: up would start mid-block
        m = MLP(h, i).half()
        m.down_proj.bias.data.normal_()
        for layer, shards in [(m.gate_up_proj, [(0, (i, h)), (1, (i, h))]), (m.down_proj, [(None, (h, i))])]:
            for shard, shape in shards:
                q, sc = quantize_block_fp8(torch.randn(shape) * 0.1, b)
                layer.weight.weight_loader(layer.weight, dequantize_block_fp8(q, sc, b).half(), shard)
                load_block_scale(layer, "weight", shard, q.shape, sc, b)
        x = torch.randn(5, h).half()
        ref = m(x)
        counts = quantize_model_fp8(m, b)
        assert counts == {"fp8": expect, "kept_dequantized": 2 - expect}, counts
        assert (m.gate_up_proj.fp8 is None) == (expect == 1)
        assert rel(m(x), ref) < 3e-3, ("fp8 mlp", h, i, rel(m(x), ref))
    print("ok")
""")


def test_moe_and_fp8_kernels_match_torch_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-c", CHECKS], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout[-2000:] + p.stderr[-4000:]


ENGINE_CHECK = textwrap.dedent("""
    import sys
    import nanovllmx.worker.worker as worker_mod
    from nanovllmx import LLM, SamplingParams
    from nanovllmx.utils.make_model import make_model
    # Qwen3-MoE FP8 with every projection on the 128-grid (experts, attention, the dense layer's MLP)
    path = make_model(sys.argv[1], preset="tiny-moe", dtype="float32", device="cpu", fp8=True,
                      moe_intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=128)
    prompts, sp = [[1, 2, 3, 4, 5], list(range(100, 140))], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = LLM(str(path), device="cpu", context_len=128)  # on CPU: dequantized at load
    ref = [o.token_ids for o in llm.generate(prompts, sp)]
    llm.shutdown()
    worker_mod.use_fp8_gemm = lambda mode, device: True  # the GPU's choice, here under the interpreter
    llm = LLM(str(path), device="cpu", context_len=128)
    n = sum(getattr(m, "fp8", None) is not None for m in llm.core.executor.worker.model.modules())
    got = [o.token_ids for o in llm.generate(prompts, sp)]
    llm.shutdown()
    assert n == 4 * 2 + 3 + 2, n  # qkv + o per layer, 3 expert layers, the dense layer's gate_up + down
    assert got == ref, (got, ref)
    print("ok")
""")


def test_fp8_fast_path_engine_matches_dequantized_under_the_interpreter(tmp_path):
    """The whole FP8 fast path (scales kept at load, quantize_model_fp8, the FP8 linear and expert
    kernels) through the offline LLM: the greedy tokens of the same checkpoint dequantized at load."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run(
        [sys.executable, "-c", ENGINE_CHECK, str(tmp_path / "moe-fp8")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout[-2000:] + p.stderr[-4000:]
