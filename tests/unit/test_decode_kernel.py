"""The FlashInfer decode kernel the engine picks per batch size and GQA group. Only a GPU can time
the kernels (`benchmarks/attn_bench.py --sweep [--heads 32]`), and a wrong choice costs throughput
silently (2.4% of the 8B shape's standard workload, 13th session), so the measured choice is pinned
here, where CI runs."""

from __future__ import annotations

from nanovllmx.attention.flashinfer_backend import decode_kernel


def test_groups_of_two_take_cuda_cores_with_split_kv_below_80() -> None:  # Qwen3-0.6B, 1.7B
    assert [decode_kernel(b, 2) for b in (1, 32, 79)] == [(False, True)] * 3
    assert [decode_kernel(b, 2) for b in (80, 128, 256)] == [(True, False)] * 3


def test_groups_of_four_and_more_take_tensor_cores_at_every_size() -> None:  # 4B, 8B, 14B, 32B, 30B-A3B
    for group in (4, 5, 8, 16):
        assert [decode_kernel(b, group) for b in (1, 16, 31)] == [(True, True)] * 3
        assert [decode_kernel(b, group) for b in (32, 79, 80, 256)] == [(True, False)] * 4
