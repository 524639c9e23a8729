"""GPU only (skipped elsewhere): the MoE and FP8 Triton kernels compiled, in bfloat16, against
the PyTorch references (tests/unit/test_triton_moe_fp8.py runs the same logic interpreted on CPU),
and the model end to end: a Qwen3-MoE checkpoint's logits through the fused experts against its
reference expert loop, an FP8 checkpoint's through the FP8 GEMMs against its dequantized weights
(both on the GPU, bf16; greedy tokens of random bf16 models are too chaotic to compare, see
docs/benchmarks.md "Reading check"), and the fused experts inside CUDA-graph decode steps."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("T", [1, 7, 256, 2000])
@pytest.mark.parametrize("E,k,H,I", [(128, 8, 512, 256), (8, 2, 256, 64)])
def test_fused_experts_bf16(T, E, k, H, I):  # noqa: E741
    from nanovllmx.kernels.fused_moe import fused_experts
    from nanovllmx.layers.moe import experts_reference, route

    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) * H**-0.5).bfloat16()
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) * I**-0.5).bfloat16()
    w, ids = route(torch.randn(T, E, device="cuda", generator=g).bfloat16(), k, True)
    out = fused_experts(x, w13, w2, w, ids)
    ref = experts_reference(x.float(), w13.float(), w2.float(), w.float(), ids)
    assert _rel(out, ref) < 1e-2


@pytest.mark.parametrize("T", [1, 64, 1500])
def test_fused_experts_fp8(T):
    from nanovllmx.kernels.fused_moe import fused_experts
    from nanovllmx.layers.fp8 import Fp8Experts, quantize_block_fp8
    from nanovllmx.layers.moe import experts_reference, route
    from nanovllmx.models.checkpoint import Fp8Scheme
    from nanovllmx.models.loader import dequantize_block_fp8

    b, E, k, H, I = Fp8Scheme(), 16, 4, 640, 384  # noqa: E741
    g = torch.Generator(device="cuda").manual_seed(T)
    w13 = torch.randn(E, 2 * I, H, device="cuda", generator=g) * H**-0.5
    w2 = torch.randn(E, H, I, device="cuda", generator=g) * I**-0.5
    q13, s13 = map(torch.stack, zip(*(quantize_block_fp8(w13[e], b) for e in range(E))))
    q2, s2 = map(torch.stack, zip(*(quantize_block_fp8(w2[e], b) for e in range(E))))
    d13 = torch.stack([dequantize_block_fp8(q13[e], s13[e], b) for e in range(E)])
    d2 = torch.stack([dequantize_block_fp8(q2[e], s2[e], b) for e in range(E)])
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    w, ids = route(torch.randn(T, E, device="cuda", generator=g), k, True)
    fp8 = Fp8Experts(q13, s13, q2, s2, (128, 128))
    out = fused_experts(x, torch.empty(0), torch.empty(0), w.bfloat16(), ids, fp8=fp8)
    assert _rel(out, experts_reference(x.float(), d13, d2, w, ids)) < 1e-2


@pytest.mark.parametrize("M", [1, 16, 100, 3000])
@pytest.mark.parametrize("N,K", [(4096, 4096), (1000, 200)])
def test_w8_linear(M, N, K):
    from nanovllmx.kernels.fp8_linear import w8_linear
    from nanovllmx.layers.fp8 import quantize_block_fp8
    from nanovllmx.models.checkpoint import Fp8Scheme
    from nanovllmx.models.loader import dequantize_block_fp8

    g = torch.Generator(device="cuda").manual_seed(M)
    w = torch.randn(N, K, device="cuda", generator=g) * K**-0.5
    q, s = quantize_block_fp8(w, Fp8Scheme())
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    bias = torch.randn(N, device="cuda", generator=g).bfloat16()
    out = w8_linear(x, q, s, (128, 128), bias)
    ref = x.float() @ dequantize_block_fp8(q, s, Fp8Scheme()).T + bias.float()
    assert out.dtype == torch.bfloat16 and _rel(out, ref) < 1e-2


PROMPTS = [[(i * 7919 + j * 104729) % 150000 for j in range(n)] for i, n in enumerate([3, 17, 60, 200, 5, 90, 33, 9])]


def _prefill_logits(path, **kw) -> tuple[torch.Tensor, int]:
    """Logits of every position of PROMPTS in one prefill step through the worker (as
    tests/engine/test_engine.py does on CPU), and how many layers run FP8 GEMMs."""
    from nanovllmx import SamplingParams
    from nanovllmx.attention.base import forward_context
    from nanovllmx.config import EngineConfig
    from nanovllmx.scheduler.request import EngineRequest
    from nanovllmx.scheduler.scheduler import Scheduler
    from nanovllmx.worker.worker import Worker

    # eager: one prefill step, and the reference MoE path (torch.unique) cannot be captured in a graph
    cfg = EngineConfig(
        model=str(path), device="cuda", context_len=512, num_kv_slots=2048, max_bs=8, enforce_eager=True, **kw
    )
    w = Worker(cfg)
    try:
        w.init_kv_cache(2048)
        sched = Scheduler(2048, 8, 512, 8192, [])
        for i, p in enumerate(PROMPTS):
            sched.add_request(EngineRequest(str(i), p, SamplingParams(temperature=0, max_tokens=1)))
        b = sched.schedule()
        assert b.num_tokens == sum(map(len, PROMPTS))
        with torch.inference_mode():
            ids, positions, meta = w.runner.prepare(b)
            w.runner.backend.prepare(meta)
            with forward_context(w.runner.backend):
                logits = w.model.compute_logits(w.model(ids, positions)).float()
        n_fp8 = sum(getattr(m, "fp8", None) is not None for m in w.model.modules())
        return logits, n_fp8
    finally:
        w.shutdown()


# head_dim 128 in every GPU test: Qwen3's, the one FlashInfer's kernels (and the bundled cache) have;
# the tiny presets' 32 is refused by FlashInfer's prefill


def test_moe_model_fused_matches_reference(tmp_path, monkeypatch):
    import nanovllmx.layers.moe as moe
    from nanovllmx.utils.make_model import make_model

    d = make_model(tmp_path / "moe", preset="tiny-moe", dtype="bfloat16", device="cuda", head_dim=128)
    fused, _ = _prefill_logits(d)
    monkeypatch.setattr(moe, "_fused_moe", lambda x: False)
    ref, _ = _prefill_logits(d)
    # bf16 both ways, rounded at different points; a near-tied router choice can flip between them
    # and send a token to another expert (an H200 measured 0.059): the argmax check is the sharp one
    assert _rel(fused, ref) < 8e-2
    assert (fused.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_moe_engine_decodes_through_cuda_graphs(tmp_path):
    """The fused experts inside captured decode graphs: no host sync, the same next tokens as eager."""
    from nanovllmx import LLM, SamplingParams
    from nanovllmx.utils.make_model import make_model

    d = make_model(tmp_path / "moe", preset="tiny-moe", dtype="bfloat16", device="cuda", head_dim=128)
    runs = []
    for eager in (False, True):
        llm = LLM(str(d), device="cuda", context_len=512, gpu_memory_utilization=0.3, enforce_eager=eager)
        try:
            assert (llm.core.executor.worker.runner.graphs is None) == eager
            outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
            runs.append([o.token_ids for o in outs])
        finally:
            llm.shutdown()
    assert all(len(t) == 6 for t in runs[0])
    # the first decode step's token (the second generated): graph and eager compute the same step
    assert sum(a[1] == b[1] for a, b in zip(*runs)) >= 6, runs


def test_fp8_model_matches_dequantized(tmp_path):
    from nanovllmx.utils.make_model import make_model

    # every projection on the 128-grid (q 256, k/v 128 rows; 512 intermediate), so all run FP8
    kw = dict(hidden_size=256, intermediate_size=512, num_attention_heads=2, num_key_value_heads=1, head_dim=128)
    d = make_model(tmp_path / "fp8", preset="tiny", dtype="bfloat16", device="cuda", fp8=True, **kw)
    fast, n_fp8 = _prefill_logits(d, fp8_gemm="triton")
    assert n_fp8 == 4 * 4  # qkv, o, gate_up, down of each layer
    slow, none = _prefill_logits(d, fp8_gemm="dequant")
    assert none == 0
    assert _rel(fast, slow) < 2e-2
    assert (fast.argmax(-1) == slow.argmax(-1)).float().mean() > 0.9
