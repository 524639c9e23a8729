"""Would splitting a decode step into two micro-batches on two CUDA streams pay? (#5's next lever,
docs/benchmarks.md, 5th session.) The decode GEMMs sit at a per-kernel floor (~6 us each however
few rows they have, ~0.5 s of the standard run above their bytes) while attention streams the KV
cache at ~90% of the copy bandwidth; two independent half-batches let one half's GEMMs run beside
the other half's attention, at the price of every weight read twice (once per half; L2 may catch
the second when the halves keep pace).

A Qwen3-0.6B decode step, 28 layers of distinct weights and KV caches, as the engine runs it
(fused add+RMSNorm, qkv GEMM, q/k norm+RoPE+K/V store, FlashInfer decode over page-1 slots,
o GEMM, add+RMSNorm, gate_up GEMM, SiLU-mul, down GEMM), captured in CUDA graphs, by batch size:
  one:  all B requests in one chain (what the engine does now);
  two:  B/2 + B/2 in two chains on two streams (own FlashInfer workspaces), forked and joined;
  half: one chain of B/2 alone (what each half costs without the other);
  fold: (--fold) the whole batch with the RMSNorms folded away, as "Next" in docs/benchmarks.md
        proposes: the residual added in the o/down GEMMs' epilogue (addmm), no norm kernel. Timing
        only: the 1/rms row scale that v and SiLU-mul would take is left out;
  prefetch: (--prefetch) the whole batch, a side stream reading each layer's o, gate_up and down
        weights into L2 (evict-last hint) while its attention streams the KV cache, so that the
        GEMMs after attention find them there (the GEMMs' floor is their first loads' latency).
Prints ms per step and two (and fold, prefetch) against one. Contexts are uniform in --ctx-min..--ctx-max.

    python -m benchmarks.overlap_bench [--sizes 64,128,256] [--shape 8b]
    TRITON_INTERPRET=1 python -m benchmarks.overlap_bench --cpu-check   # plumbing only: halves == whole
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from nanovllmx.kernels.fused import qk_norm_rope_store, rmsnorm, silu_and_mul

SHAPES = {"0.6b": (1024, 16, 3072, 28), "8b": (4096, 32, 12288, 36)}  # hidden, heads, intermediate, layers
HID, H, INTER, _ = SHAPES["0.6b"]  # main() sets the shape of --shape
HKV, D, EPS = 8, 128, 1e-6


@dataclass
class Layer:
    w_in: torch.Tensor
    w_post: torch.Tensor
    qkv: torch.Tensor
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    qw: torch.Tensor
    kw: torch.Tensor
    k: torch.Tensor  # [slots, HKV, D]
    v: torch.Tensor


def make_layers(n: int, slots: int, dev: torch.device, dt: torch.dtype) -> list[Layer]:
    def w(o: int, i: int) -> torch.Tensor:
        return torch.randn(o, i, device=dev, dtype=dt) * 0.02

    def ones(n_: int) -> torch.Tensor:
        return torch.ones(n_, device=dev, dtype=dt)

    return [
        Layer(
            ones(HID),
            ones(HID),
            w((H + 2 * HKV) * D, HID),
            w(HID, H * D),
            w(2 * INTER, HID),
            w(HID, INTER),
            ones(D),
            ones(D),
            torch.randn(slots, HKV, D, device=dev, dtype=dt),
            torch.randn(slots, HKV, D, device=dev, dtype=dt),
        )
        for _ in range(n)
    ]


class Chain:
    """One micro-batch: its rows' inputs, positions, slots and its own attention (wrapper + plan)."""

    def __init__(self, x: torch.Tensor, res: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, attend):
        self.x, self.res, self.pos, self.slots, self.attend = x, res, pos, slots, attend

    def run(
        self, layers: list[Layer], cos_sin: torch.Tensor, prefetch: torch.cuda.Stream | None = None
    ) -> torch.Tensor:
        """The chain's decode step; with a `prefetch` stream, that stream reads each layer's o,
        gate_up and down weights into L2 while the layer's attention runs (--prefetch)."""
        x, res = self.x, self.res
        b = x.shape[0]
        cur = torch.cuda.current_stream() if prefetch is not None else None
        scratch = torch.empty(1 << 12, dtype=torch.float32, device=x.device) if prefetch is not None else None
        for i, L in enumerate(layers):
            h, res = rmsnorm(x, L.w_in, EPS, res)
            q = qk_norm_rope_store(h @ L.qkv.t(), H, HKV, D, L.qw, L.kw, EPS, cos_sin, self.pos, L.k, L.v, self.slots)
            if prefetch is not None:
                prefetch.wait_stream(cur)
                with torch.cuda.stream(prefetch):
                    touch((L.o, L.gate_up, L.down), scratch)
            a = self.attend(i, q, L)
            if prefetch is not None:
                cur.wait_stream(prefetch)
            h, res = rmsnorm(a.reshape(b, H * D) @ L.o.t(), L.w_post, EPS, res)
            x = silu_and_mul(h @ L.gate_up.t()) @ L.down.t()
        return x + res

    def run_folded(self, layers: list[Layer], cos_sin: torch.Tensor) -> torch.Tensor:
        res = self.res
        b = res.shape[0]
        for i, L in enumerate(layers):
            q = qk_norm_rope_store(res @ L.qkv.t(), H, HKV, D, L.qw, L.kw, EPS, cos_sin, self.pos, L.k, L.v, self.slots)
            res = torch.addmm(res, self.attend(i, q, L).reshape(b, H * D), L.o.t())
            res = torch.addmm(res, silu_and_mul(res @ L.gate_up.t()), L.down.t())
        return res


@triton.jit
def _touch_kernel(w_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Read BLOCK elements into L2 with the evict-last hint; one value per program keeps the load."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(w_ptr + offs, mask=offs < n, other=0.0, eviction_policy="evict_last")
    tl.store(out_ptr + tl.program_id(0), tl.max(x.to(tl.float32), axis=0))


def touch(ws: tuple[torch.Tensor, ...], scratch: torch.Tensor) -> None:
    for w in ws:
        n = w.numel()
        _touch_kernel[(triton.cdiv(n, 8192),)](w, scratch, n, BLOCK=8192, num_warps=8)


def torch_attend(indptr: np.ndarray, idx: torch.Tensor):
    """Reference decode attention over page-1 slot lists (the CPU check's stand-in for FlashInfer)."""

    def attend(_: int, q: torch.Tensor, L: Layer) -> torch.Tensor:
        out = []
        for r in range(q.shape[0]):
            s = idx[indptr[r] : indptr[r + 1]].long()
            k, v = L.k[s].float().repeat_interleave(H // HKV, 1), L.v[s].float().repeat_interleave(H // HKV, 1)
            p = torch.softmax(torch.einsum("hd,thd->ht", q[r].float(), k) / D**0.5, dim=-1)
            out.append(torch.einsum("ht,thd->hd", p, v).to(q.dtype))
        return torch.stack(out)

    return attend


def flashinfer_attend(indptr: np.ndarray, idx: torch.Tensor, layers: list[Layer], dev: torch.device):
    """A graph-mode FlashInfer decode wrapper with its own workspace, planned once for these rows
    with the engine's choice of kernel (`decode_kernel`)."""
    import flashinfer

    from nanovllmx.attention.flashinfer_backend import decode_kernel

    b = len(indptr) - 1
    tc, split = decode_kernel(b, H // HKV)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        torch.zeros(256 << 20, dtype=torch.uint8, device=dev),
        "NHD",
        use_cuda_graph=True,
        use_tensor_cores=tc,
        paged_kv_indptr_buffer=torch.zeros(b + 1, dtype=torch.int32, device=dev),
        paged_kv_indices_buffer=torch.zeros(len(idx), dtype=torch.int32, device=dev),
        paged_kv_last_page_len_buffer=torch.ones(b, dtype=torch.int32, device=dev),
    )
    w.plan(
        torch.from_numpy(indptr.astype(np.int32)),
        idx,
        torch.ones(b, dtype=torch.int32),
        H,
        HKV,
        D,
        1,
        q_data_type=layers[0].k.dtype,
        kv_data_type=layers[0].k.dtype,
        **({} if split else {"disable_split_kv": True}),
    )
    pages = [(L.k.unsqueeze(1), L.v.unsqueeze(1)) for L in layers]
    return lambda i, q, L: w.run(q, pages[i])


def batch(lens: np.ndarray, perm: np.ndarray, dev: torch.device, dt: torch.dtype, attend_of):
    """Chains for rows [0, B) and for the halves [0, B/2) and [B/2, B): the same slots and inputs."""
    indptr = np.concatenate([[0], np.cumsum(lens)])
    idx = torch.from_numpy(perm[: indptr[-1]].astype(np.int32)).to(dev)
    B = len(lens)
    x = torch.randn(B, HID, device=dev, dtype=dt)
    res = torch.randn(B, HID, device=dev, dtype=dt)
    pos = torch.from_numpy((lens - 1).astype(np.int32)).to(dev)
    slots = idx[torch.from_numpy(indptr[1:] - 1).to(dev)]

    def chain(lo: int, hi: int) -> Chain:
        sub = indptr[lo : hi + 1] - indptr[lo]
        return Chain(
            x[lo:hi].clone(),
            res[lo:hi].clone(),
            pos[lo:hi].clone(),
            slots[lo:hi].clone(),
            attend_of(sub, idx[indptr[lo] : indptr[hi]].clone()),
        )

    return chain(0, B), chain(0, B // 2), chain(B // 2, B), int(indptr[-1])


def cpu_check() -> None:
    torch.manual_seed(0)
    dev, dt = torch.device("cpu"), torch.float32
    rng = np.random.default_rng(0)
    lens = rng.integers(3, 9, 6)
    slots = int(lens.sum()) + 8
    layers = make_layers(2, slots, dev, dt)
    from nanovllmx.layers.rotary import RotaryEmbedding

    cos_sin = RotaryEmbedding(D, 64, 1e6).cos_sin
    whole, a, b, _ = batch(lens, rng.permutation(slots), dev, dt, torch_attend)
    k0 = [L.k.clone() for L in layers]
    y = whole.run(layers, cos_sin)
    for L, k in zip(layers, k0):
        L.k.copy_(k)
    y2 = torch.cat([a.run(layers, cos_sin), b.run(layers, cos_sin)])
    err = ((y - y2).norm() / y.norm()).item()
    assert err < 1e-5, err
    assert whole.run_folded(layers, cos_sin).shape == y.shape  # the --fold chain runs (its numbers are not the model's)
    print(f"cpu check: two halves give the whole batch's output (rel. err {err:.1e})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="64,128,256")
    ap.add_argument("--ctx-min", type=int, default=300)
    ap.add_argument("--ctx-max", type=int, default=1800)
    ap.add_argument("--shape", choices=SHAPES, default="0.6b")
    ap.add_argument("--layers", type=int, default=None, help="default: the shape's")
    ap.add_argument("--cpu-check", action="store_true")
    ap.add_argument("--fold", action="store_true", help="also time the step with the RMSNorms folded away")
    ap.add_argument("--prefetch", action="store_true", help="also time the step with the weights prefetched into L2")
    a = ap.parse_args()
    if a.cpu_check:
        return cpu_check()
    global HID, H, INTER  # the chains read the shape from these (a benchmark script: one shape per run)
    HID, H, INTER, layers_default = SHAPES[a.shape]
    a.layers = a.layers or layers_default
    from benchmarks.roofline import copy_bandwidth
    from nanovllmx.layers.rotary import RotaryEmbedding
    from nanovllmx.utils.profiling import graph_time

    dev, dt = torch.device("cuda"), torch.bfloat16
    bw = copy_bandwidth()
    sizes = [int(s) for s in a.sizes.split(",")]
    rng = np.random.default_rng(0)
    slots = max(sizes) * a.ctx_max + 1024
    layers = make_layers(a.layers, slots, dev, dt)
    cos_sin = RotaryEmbedding(D, 4096, 1e6).cos_sin.to(dev)
    s2 = torch.cuda.Stream()
    wbytes = sum(t.numel() * 2 for L in layers for t in (L.qkv, L.o, L.gate_up, L.down))
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s; {a.layers} layers, weights {wbytes / 1e9:.2f} GB")
    print(
        f"{'B':>4s} {'ctx':>5s} {'bytes ms':>8s} {'one':>8s} {'two':>8s} {'half':>8s} {'two/one':>8s}"
        + (f" {'fold':>8s} {'fold/one':>8s}" if a.fold else "")
        + (f" {'prefetch':>8s} {'pf/one':>8s}" if a.prefetch else "")
        + "  (ms per decode step)"
    )
    for B in sizes:
        lens = rng.integers(a.ctx_min, a.ctx_max + 1, B)
        whole, h1, h2, total = batch(
            lens, rng.permutation(slots), dev, dt, lambda ip, ix: flashinfer_attend(ip, ix, layers, dev)
        )

        def two(h1=h1, h2=h2):
            cur = torch.cuda.current_stream()
            s2.wait_stream(cur)
            with torch.cuda.stream(s2):
                h2.run(layers, cos_sin)
            h1.run(layers, cos_sin)
            cur.wait_stream(s2)

        t_one = graph_time(lambda whole=whole: whole.run(layers, cos_sin), 20) * 1e3
        t_two = graph_time(two, 20) * 1e3
        t_half = graph_time(lambda h1=h1: h1.run(layers, cos_sin), 20) * 1e3
        byts = wbytes + total * a.layers * HKV * D * 2 * 2
        fold = ""
        if a.fold:
            t_fold = graph_time(lambda whole=whole: whole.run_folded(layers, cos_sin), 20) * 1e3
            fold = f" {t_fold:8.3f} {t_fold / t_one:8.3f}"
        if a.prefetch:
            t_pf = graph_time(lambda whole=whole: whole.run(layers, cos_sin, prefetch=s2), 20) * 1e3
            fold += f" {t_pf:8.3f} {t_pf / t_one:8.3f}"
        print(
            f"{B:4d} {int(lens.mean()):5d} {byts / bw * 1e3:8.3f} {t_one:8.3f} {t_two:8.3f} {t_half:8.3f} "
            f"{t_two / t_one:8.3f}{fold}"
        )


if __name__ == "__main__":
    main()
