"""GPU only (skipped elsewhere): the FlashInfer backend, eager and through a CUDA-graph decode
wrapper, computes the same attention as the torch reference backend on a mixed batch (prefill
chunks with cached prefixes plus decodes) and on a pure decode batch; fused kernels match torch
(the q/k norm + RoPE + K/V store kernel also replayed from a CUDA graph)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

H, HKV, D, SLOTS, CTX, MAX_BS = 16, 8, 128, 8192, 2048, 48


def _setup(prefix_lens, q_lens, seed=0, heads=H):
    from nanovllmx.attention.metadata import AttentionMetadata, KVPool

    g = torch.Generator(device="cpu").manual_seed(seed)
    pool = KVPool(1, SLOTS, HKV, D, torch.bfloat16, torch.device("cuda"))
    pool.k[0].copy_(torch.randn(pool.k[0].shape, generator=g))
    pool.v[0].copy_(torch.randn(pool.v[0].shape, generator=g))
    table = torch.zeros((MAX_BS + 1, CTX), dtype=torch.int32, device="cuda")
    perm = torch.randperm(SLOTS, generator=g)[: sum(prefix_lens) + sum(q_lens)] + 1
    out_slots, off = [], 0
    for r, (p, q) in enumerate(zip(prefix_lens, q_lens)):
        table[r, : p + q] = perm[off : off + p + q].to(torch.int32).cuda()
        out_slots.append(perm[off + p : off + p + q])
        off += p + q
    q_np, kv_np = np.array(q_lens, np.int32), np.array(prefix_lens, np.int32) + np.array(q_lens, np.int32)
    meta = AttentionMetadata(
        q_lens_np=q_np,
        kv_lens_np=kv_np,
        req_indices_np=np.arange(len(q_lens), dtype=np.int32),
        req_indices=torch.arange(len(q_lens), dtype=torch.int32, device="cuda"),
        out_slots=torch.cat(out_slots).to(torch.int32).cuda(),
        req_to_token=table,
        is_decode=bool((q_np == 1).all()),
    )
    T = int(q_np.sum())
    q = torch.randn(T, heads, D, generator=g).to("cuda", torch.bfloat16)
    k = torch.randn(T, HKV, D, generator=g).to("cuda", torch.bfloat16)
    v = torch.randn(T, HKV, D, generator=g).to("cuda", torch.bfloat16)
    return pool, meta, q, k, v


def _run(backend_cls, prefix_lens, q_lens, graph=False, heads=H, **kw):
    pool, meta, q, k, v = _setup(prefix_lens, q_lens, heads=heads)
    be = backend_cls(pool, heads, HKV, D, **kw)
    if graph:
        w = be.make_graph_wrapper(len(q_lens))
        be.plan_graph(w, meta)
        be.gather_graph_indices(w, meta)  # inside the graph in the engine
    else:
        be.prepare(meta)
    return be.forward(0, q, k, v, D**-0.5).float()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("heads", [16, 32])  # GQA groups of 2 (Qwen3-0.6B) and 4 (8B): other kernel choices
@pytest.mark.parametrize("tc", [False, True, None])  # None: the engine's choice (decode_kernel)
@pytest.mark.parametrize(
    "prefix_lens,q_lens",
    [
        ([0, 37, 100, 5], [50, 13, 1, 1]),  # prefill chunks with cached prefixes, mixed with decodes
        ([1, 700, 63, 1500, 3, 99, 256, 12], [1] * 8),  # pure decode (split-KV)
        ([(37 * r) % 300 + 1 for r in range(40)], [1] * 40),  # pure decode, 40 rows (no split-KV for groups of 4)
    ],
)
def test_flashinfer_matches_torch(prefix_lens, q_lens, tc, heads):
    from nanovllmx.attention.flashinfer_backend import FlashInferBackend
    from nanovllmx.attention.torch_backend import TorchBackend

    ref = _run(TorchBackend, prefix_lens, q_lens, heads=heads)
    kw = dict(max_bs=MAX_BS, context_len=CTX, decode_tensor_cores=tc, heads=heads)
    out = _run(FlashInferBackend, prefix_lens, q_lens, **kw)
    assert _rel(out, ref) < 2e-2
    if all(n == 1 for n in q_lens):
        out_g = _run(FlashInferBackend, prefix_lens, q_lens, graph=True, **kw)
        assert _rel(out_g, ref) < 2e-2


def test_fused_kernels_match_torch():
    from nanovllmx.layers.norm import RMSNorm
    from nanovllmx.layers.rotary import RotaryEmbedding

    torch.manual_seed(0)
    x = torch.randn(300, 1024, device="cuda", dtype=torch.bfloat16) * 3
    res = torch.randn_like(x)
    norm = RMSNorm(1024).cuda().to(torch.bfloat16)
    norm.weight.data.normal_()
    y_fast, r_fast = norm(x, res)
    y_ref, r_ref = norm.forward_native(x, res)
    assert _rel(r_fast.float(), r_ref.float()) < 1e-2 and _rel(y_fast.float(), y_ref.float()) < 2e-2
    assert _rel(norm(x).float(), norm.forward_native(x).float()) < 2e-2
    from nanovllmx.kernels.fused import qk_norm_rope_store, silu_and_mul, store_kv
    from nanovllmx.layers.activation import SiluAndMul

    gu = torch.randn(300, 2 * 3072, device="cuda", dtype=torch.bfloat16)
    assert _rel(silu_and_mul(gu).float(), SiluAndMul().forward_native(gu).float()) < 2e-2
    # q/k norm + RoPE + K/V store in one kernel, eagerly and replayed from a CUDA graph with new
    # positions and slots written into the captured buffers
    T, S = 300, 1000
    qkv = torch.randn(T, (16 + 2 * 8) * 128, device="cuda", dtype=torch.bfloat16)
    qn, kn = RMSNorm(128).cuda().to(torch.bfloat16), RMSNorm(128).cuda().to(torch.bfloat16)
    qn.weight.data.normal_()
    kn.weight.data.normal_()
    rope = RotaryEmbedding(128, 4096, 1e6).cuda()
    pos = torch.randint(0, 4096, (T,), device="cuda", dtype=torch.int32)
    slots = torch.randperm(S, device="cuda")[:T].to(torch.int32)
    kc = torch.zeros(S, 8, 128, device="cuda", dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)

    def check(q):
        qs, ks, vs = qkv.split([2048, 1024, 1024], dim=-1)
        qr, kr = rope.forward_native(
            pos.long(), qn.forward_native(qs.reshape(T, 16, 128)), kn.forward_native(ks.reshape(T, 8, 128))
        )
        assert _rel(q.float(), qr.float()) < 2e-2 and _rel(kc[slots.long()].float(), kr.float()) < 2e-2
        assert torch.equal(vc[slots.long()], vs.reshape(T, 8, 128))
        assert kc.float().abs().sum(-1).sum(-1).count_nonzero() == T  # nothing else written

    def run():
        return qk_norm_rope_store(qkv, 16, 8, 128, qn.weight, kn.weight, qn.eps, rope.cos_sin, pos, kc, vc, slots)

    check(run())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        q_graph = run()
    pos.copy_(torch.randint(0, 4096, (T,), device="cuda", dtype=torch.int32))
    slots.copy_(torch.randperm(S, device="cuda")[:T].to(torch.int32))
    kc.zero_()
    vc.zero_()
    g.replay()
    check(q_graph)
    k, v = qkv[:, 2048:3072].view(T, 8, 128), qkv[:, 3072:].view(T, 8, 128)  # column slices, as in the model
    kc.zero_()
    store_kv(k, v, kc, vc, slots)
    assert torch.equal(kc[slots.long()], k) and torch.equal(vc[slots.long()], v)
    assert kc.float().abs().sum(-1).sum(-1).count_nonzero() == T  # nothing else written


def test_fused_sampler_full_vocab_bf16():
    """The two-stage sampling kernels over a real-size bf16 vocabulary (149 blocks, 19 parts a
    row): greedy rows are argmax, a dominant token in the last block is always drawn, and a row's
    draws follow its softmax (two tokens in the first and last blocks, mass split 3:1)."""
    from nanovllmx.kernels.sampling import gumbel_sample

    V, B = 151936, 256
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(B, V, device="cuda", generator=g).to(torch.bfloat16)
    inv_t = torch.full((B,), 1 / 0.6, device="cuda")
    inv_t[::2] = 0  # greedy rows
    seeds = torch.arange(B, dtype=torch.int32, device="cuda")
    out = gumbel_sample(logits, inv_t, seeds)
    assert torch.equal(out[::2].long(), logits[::2].float().argmax(-1))
    hot = torch.full((B, V), -30.0, device="cuda", dtype=torch.bfloat16)
    hot[:, V - 1] = 10.0
    assert (gumbel_sample(hot, torch.ones(B, device="cuda"), seeds) == V - 1).all()
    two = torch.full((4096, V), float("-inf"), device="cuda", dtype=torch.bfloat16)
    two[:, 5], two[:, V - 7] = float(np.log(3.0)), 0.0
    draws = gumbel_sample(two, torch.ones(4096, device="cuda"), torch.arange(4096, dtype=torch.int32, device="cuda"))
    assert set(draws.tolist()) <= {5, V - 7}
    frac = (draws == 5).float().mean().item()
    assert abs(frac - 0.75) < 0.03, frac  # ~5 sigma for 4096 draws
