"""The benchmark kit, run from the checkout's root (`python -m benchmarks.<module>`); bench.py at
the root imports the roofline from here. docs/benchmarks.md says what each answers.

- roofline: the standard workload's lower bound for a checkpoint's shape (config.json) at a copy
  bandwidth, and the copy-bandwidth measurement (`bench.py --bw`)
- gpu_run.sh: the GPU runner (targets check, offline, http, multi; A/B against BASE=other tree)
- gpu_check: greedy tokens of every engine path against the torch backend on the GPU
- attn_bench: FlashInfer decode attention's bandwidth by batch size (small batches: open question)
- gemm_bench: the decode GEMMs' per-kernel latency floor (cuBLAS) against their bytes
- overlap_bench: two micro-batches on two streams against one decode step (the floor's next lever)
"""
