"""Code generation: planned element-wise passes as fused kernels (C on the CPU, Triton on the GPU)."""
