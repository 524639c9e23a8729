"""The Triton kernels (kernels/fused.py, kernels/sampling.py) on the CPU through Triton's
interpreter (TRITON_INTERPRET=1, in a subprocess: the variable is read when kernels are defined),
against their PyTorch twins, so CI checks their logic without a GPU. tests/gpu/test_gpu_backends.py
runs the same comparisons compiled, on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

CHECKS = textwrap.dedent("""
    import numpy as np, torch
    torch.manual_seed(0)
    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    # ---- fused.py against the layers' PyTorch paths
    from nanovllmx.kernels.fused import qk_norm_rope_store, rmsnorm, silu_and_mul, store_kv
    from nanovllmx.layers.norm import RMSNorm
    from nanovllmx.layers.rotary import RotaryEmbedding
    from nanovllmx.layers.activation import SiluAndMul
    T = 24
    x = (torch.randn(T, 256) * 3).to(torch.bfloat16)
    res = torch.randn_like(x)
    norm = RMSNorm(256).to(torch.bfloat16)
    norm.weight.data.normal_()
    y, r = rmsnorm(x, norm.weight, norm.eps, res)
    y_ref, r_ref = norm.forward_native(x, res)
    assert rel(r, r_ref) < 1e-2 and rel(y, y_ref) < 2e-2, "rmsnorm + residual"
    assert rel(rmsnorm(x, norm.weight, norm.eps), norm.forward_native(x)) < 2e-2, "rmsnorm"
    gu = torch.randn(T, 2 * 96).to(torch.bfloat16)
    assert rel(silu_and_mul(gu), SiluAndMul().forward_native(gu)) < 2e-2, "silu_and_mul"
    qkv = torch.randn(T, (4 + 2 * 2) * 64).to(torch.bfloat16)
    k, v = qkv[:, 256:384].view(T, 2, 64), qkv[:, 384:].view(T, 2, 64)  # strided column slices
    kc, vc = torch.zeros(100, 2, 64, dtype=torch.bfloat16), torch.zeros(100, 2, 64, dtype=torch.bfloat16)
    slots = torch.randperm(100)[:T].to(torch.int32)
    store_kv(k, v, kc, vc, slots)
    assert torch.equal(kc[slots.long()], k) and torch.equal(vc[slots.long()], v), "store_kv"
    assert kc.abs().sum((1, 2)).count_nonzero() == T, "store_kv wrote elsewhere"

    # ---- qk_norm_rope_store against the layers' twins: per-head RMSNorm (own q / k weights), neox
    # RoPE, keys and values scattered into a pool at out-of-order slots, other rows untouched.
    # float16 must round exactly as the twins (HF's order); bfloat16 only loosely, because the
    # interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest
    D, S = 64, 40
    rope = RotaryEmbedding(D, 512, 1e6)
    for dt, T, H, HKV in [(torch.bfloat16, 0, 4, 2), (torch.bfloat16, 1, 4, 2), (torch.bfloat16, 13, 4, 2),
                          (torch.float16, 13, 4, 2), (torch.float32, 1, 4, 2), (torch.float32, 13, 4, 2),
                          (torch.float32, 7, 6, 3)]:  # head counts that are no power of two: masked rows
        qn, kn = RMSNorm(D, 1e-6).to(dt), RMSNorm(D, 1e-6).to(dt)
        qn.weight.data.normal_()
        kn.weight.data.normal_()
        W = (H + 2 * HKV) * D
        wide = (torch.randn(T, W + 64) * 3).to(dt)
        qkv = wide[:, :W] if dt == torch.float32 else wide[:, :W].contiguous()  # a row stride of its own too
        pos = torch.randint(0, 512, (T,), dtype=torch.int32 if dt == torch.bfloat16 else torch.int64)
        slots = torch.randperm(S)[:T].to(torch.int32)
        kc, vc = torch.randn(S, HKV, D).to(dt), torch.randn(S, HKV, D).to(dt)
        kc0, vc0 = kc.clone(), vc.clone()
        q = qk_norm_rope_store(qkv, H, HKV, D, qn.weight, kn.weight, qn.eps, rope.cos_sin, pos, kc, vc, slots)
        qs, ks, vs = qkv.split([H * D, HKV * D, HKV * D], dim=-1)
        qr, kr = rope.forward_native(pos.long(), qn.forward_native(qs.reshape(T, H, D)),
                                     kn.forward_native(ks.reshape(T, HKV, D)))
        assert q.shape == (T, H, D) and q.dtype == dt and q.is_contiguous()
        s_ = slots.long()
        for name, got, ref in [("q", q, qr), ("k", kc[s_], kr)]:
            if not T:
                continue
            if dt == torch.float16:
                assert (got != ref).float().mean() < 0.01, (name, dt, T, (got != ref).float().mean())
            else:
                assert rel(got, ref) < (1e-5 if dt == torch.float32 else 2e-2), (name, dt, T, rel(got, ref))
        assert torch.equal(vc[s_], vs.reshape(T, HKV, D)), ("v", dt, T)
        rest = torch.ones(S, dtype=torch.bool)
        rest[s_] = False
        assert torch.equal(kc[rest], kc0[rest]) and torch.equal(vc[rest], vc0[rest]), ("rows outside slots", dt, T)

    # ---- the Attention layer's fused path (forced on for this CPU pool) against its unfused path,
    # through the model's Qwen3Attention and the torch backend: a prefill chunk after a cached
    # prefix, mixed with a decode
    import types
    import nanovllmx.layers.attention as attn_mod
    from nanovllmx.attention.base import forward_context
    from nanovllmx.attention.metadata import AttentionMetadata, KVPool
    from nanovllmx.attention.torch_backend import TorchBackend
    from nanovllmx.models.qwen3 import Qwen3Attention
    cfg = types.SimpleNamespace(hidden_size=128, head_dim=64, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1e6)
    layer = Qwen3Attention(cfg, 1)  # float32: the two paths agree to rounding, any wiring slip shows
    for p_ in layer.parameters():
        p_.data.normal_(0, 0.2)
    prefix, q_lens = [5, 9], [4, 1]
    slots_all = (torch.randperm(40)[:sum(prefix) + sum(q_lens)] + 1).to(torch.int32)
    table = torch.zeros(3, 64, dtype=torch.int32)
    out_slots, pos_l, off = [], [], 0
    for r, (p, n) in enumerate(zip(prefix, q_lens)):
        table[r, :p + n] = slots_all[off:off + p + n]
        out_slots.append(slots_all[off + p:off + p + n])
        pos_l += list(range(p, p + n))
        off += p + n
    q_np = np.array(q_lens, np.int32)
    kv_np = np.array(prefix, np.int32) + q_np
    meta = AttentionMetadata(q_lens_np=q_np, kv_lens_np=kv_np, req_indices_np=np.arange(2, dtype=np.int32),
                             req_indices=torch.arange(2, dtype=torch.int32),
                             out_slots=torch.cat(out_slots), req_to_token=table, is_decode=False)
    hid = torch.randn(5, 128)
    positions = torch.tensor(pos_l, dtype=torch.int32)
    class CountingBackend(TorchBackend):  # the fused path must not store K/V a second time
        stores = 0
        def store_kv(self, layer, k, v):
            self.stores += 1
            super().store_kv(layer, k, v)
    outs, pools, stores, on_cuda = [], [], [], attn_mod._fused_qkv
    for fused in (False, True):
        attn_mod._fused_qkv = lambda kc: fused
        torch.manual_seed(1)  # the same cached prefix in both pools
        pool = KVPool(3, 41, 2, 64, torch.float32, torch.device("cpu"))
        for t_ in pool.k + pool.v:
            t_.normal_()
        be = CountingBackend(pool, 4, 2, 64)
        be.prepare(meta)
        with forward_context(be):
            outs.append(layer(positions, hid))
        pools.append(pool)
        stores.append(be.stores)
    attn_mod._fused_qkv = on_cuda
    assert stores == [1, 0], ("K/V stores by the unfused / fused path", stores)
    assert rel(outs[1], outs[0]) < 1e-5, ("fused layer output", rel(outs[1], outs[0]))
    assert rel(pools[1].k[1], pools[0].k[1]) < 1e-5 and torch.equal(pools[1].v[1], pools[0].v[1]), "fused layer pool"
    assert torch.equal(pools[1].k[0], pools[0].k[0]) and torch.equal(pools[1].k[2], pools[0].k[2]), "other layers"

    # ---- sampling.py: a block by its mass, then a column of it (several programs per row)
    from nanovllmx.kernels import sampling
    sampling._BLOCK, sampling._CHUNK = 512, 1024  # several blocks and parts per row even for this small vocabulary
    V, B = 3000, 8
    logits = torch.randn(B, V).to(torch.bfloat16)
    inv_t = torch.full((B,), 1 / 0.6)
    inv_t[::2] = 0
    out = sampling.gumbel_sample(logits, inv_t, torch.arange(B, dtype=torch.int32))
    assert torch.equal(out[::2].long(), logits[::2].float().argmax(-1)), "greedy rows are argmax"
    hot = torch.full((B, V), -30.0).to(torch.bfloat16)
    hot[:, V - 1] = 10.0
    assert (sampling.gumbel_sample(hot, torch.ones(B), torch.arange(B, dtype=torch.int32)) == V - 1).all()
    n = 600  # the interpreter runs ~100 programs a second
    three = torch.full((n, 1024), float("-inf")).to(torch.bfloat16)  # two blocks, one part
    three[:, 5], three[:, 300], three[:, 1017] = float(np.log(3.0)), 0.0, float(np.log(2.0))
    d = sampling.gumbel_sample(three, torch.ones(n), torch.arange(n, dtype=torch.int32))
    assert set(d.tolist()) <= {5, 300, 1017}
    freq = [(d == c).float().mean().item() for c in (5, 300, 1017)]
    assert all(abs(f - p) < 4 * (p * (1 - p) / n) ** 0.5 for f, p in zip(freq, (0.5, 1 / 6, 1 / 3))), \\
        ("draws follow softmax (3:1:2) within and across blocks, 4 sigma", freq)
    assert (sampling.gumbel_sample(three[:4], torch.zeros(4), torch.arange(4, dtype=torch.int32)) == 5).all()
    row = torch.randn(1, V).expand(4, V).contiguous()
    keyed = sampling.gumbel_sample(row, torch.ones(4), torch.tensor([7, 7, 8, 8], dtype=torch.int32)).tolist()
    assert keyed[0] == keyed[1] and keyed[2] == keyed[3], "a key gives one draw"
    sampling._CHUNK = 2048
    assert sampling.gumbel_sample(row[:1], torch.ones(1), torch.tensor([7], dtype=torch.int32)).item() == keyed[0], \\
        "the draw does not depend on how the row is split"
    # the Sampler's glue around the kernel (temperatures, per-row keys, seeded rows)
    from nanovllmx.scheduler.messages import SamplingArrays
    from nanovllmx.worker.sampler import Sampler
    s = Sampler(torch.device("cpu"), fused=True)
    sa = SamplingArrays(temperature=np.array([0.0, 0.8, 0.8, 0.8], np.float32), top_p=np.ones(4, np.float32),
                        top_k=np.zeros(4, np.int32), min_p=np.zeros(4, np.float32),
                        seeds=np.array([-1, 5, 5, 6], np.int64), output_lens=np.zeros(4, np.int32),
                        needs_filter=False, all_greedy=False)
    x = torch.randn(1, 3000).expand(4, -1).contiguous()
    out = s(x, sa)
    assert out[0] == x[0].argmax() and out[1] == out[2], "greedy row; one seed and step, one draw"
    print("ok")
""")


def test_triton_kernels_match_torch_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-c", CHECKS], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout[-2000:] + p.stderr[-4000:]
