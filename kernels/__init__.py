"""Fused Triton kernels for the KD loss, each beside its one PyTorch reference."""
