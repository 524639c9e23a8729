"""Fused Triton kernels for the GPU hot path. Each has a plain-PyTorch twin in the layer that uses
it (`forward_native`), which CPU runs and the tests compare against."""
