"""Triton kernels (fused adapter bottleneck, fused distillation loss) with torch references."""
