"""Execution back-ends of packed GQSA layers: ``reference`` (pure torch, any device) and fused
Triton kernels where a GPU is present."""
