"""The Triton kernels (kernels/fused.py, kernels/sampling.py) on the CPU through Triton's
interpreter (TRITON_INTERPRET=1, in a subprocess: the variable is read when kernels are defined),
against their PyTorch twins, so CI checks their logic without a GPU. tests/test_gpu_backends.py
runs the same comparisons compiled, on a GPU."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

CHECKS = textwrap.dedent('''
    import numpy as np, torch
    torch.manual_seed(0)
    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    # ---- fused.py against the layers' PyTorch paths
    from nanovllmx.kernels.fused import head_norm_rope, rmsnorm, silu_and_mul, store_kv
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
    qkv = torch.randn(T, (4 + 2 * 2) * 64).to(torch.bfloat16)
    hn = RMSNorm(64).to(torch.bfloat16)
    hn.weight.data.normal_()
    rope = RotaryEmbedding(64, 512, 1e6)
    pos = torch.randint(0, 512, (T,))
    q_slice, k_slice = qkv[:, :256], qkv[:, 256:384]
    qr, kr = rope.forward_native(pos, hn.forward_native(q_slice.reshape(T, 4, 64)),
                                 hn.forward_native(k_slice.reshape(T, 2, 64)))
    qf = head_norm_rope(q_slice, 4, 64, hn.weight, hn.eps, rope.cos_sin, pos)
    kf = head_norm_rope(k_slice, 2, 64, hn.weight, hn.eps, rope.cos_sin, pos)
    assert rel(qf, qr) < 2e-2 and rel(kf, kr) < 2e-2, "head_norm_rope"
    gu = torch.randn(T, 2 * 96).to(torch.bfloat16)
    assert rel(silu_and_mul(gu), SiluAndMul().forward_native(gu)) < 2e-2, "silu_and_mul"
    kc, vc = torch.zeros(100, 2, 64, dtype=torch.bfloat16), torch.zeros(100, 2, 64, dtype=torch.bfloat16)
    slots = torch.randperm(100)[:T].to(torch.int32)
    v = qkv[:, 384:].view(T, 2, 64)  # a strided column slice, as in the model
    store_kv(kf, v, kc, vc, slots)
    assert torch.equal(kc[slots.long()], kf) and torch.equal(vc[slots.long()], v), "store_kv"
    assert kc.abs().sum((1, 2)).count_nonzero() == T, "store_kv wrote elsewhere"

    # ---- sampling.py: Gumbel-max over several programs per row
    from nanovllmx.kernels import sampling
    sampling._CHUNK = 1024  # several parts per row even for this small vocabulary
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
    two = torch.full((n, 1024), float("-inf")).to(torch.bfloat16)
    two[:, 5], two[:, 1017] = float(np.log(3.0)), 0.0
    d = sampling.gumbel_sample(two, torch.ones(n), torch.arange(n, dtype=torch.int32))
    assert set(d.tolist()) <= {5, 1017}
    assert abs((d == 5).float().mean().item() - 0.75) < 0.07, "draws follow softmax (3:1), 4 sigma"
    row = torch.randn(1, V).expand(4, V).contiguous()
    keyed = sampling.gumbel_sample(row, torch.ones(4), torch.tensor([7, 7, 8, 8], dtype=torch.int32)).tolist()
    assert keyed[0] == keyed[1] and keyed[2] == keyed[3], "a key gives one draw"
    sampling._CHUNK = 4096
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
''')


def test_triton_kernels_match_torch_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-c", CHECKS], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout[-2000:] + p.stderr[-4000:]
