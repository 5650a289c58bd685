"""Fused Triton kernels for the KD loss, each beside its one PyTorch reference.

Each functional alias (`layer_mse`, `attention_map_mse`, `attention_score_mse`,
`attention_prob_mse`) runs its Triton kernel on CUDA tensors or under TRITON_INTERPRET=1, and its
reference everywhere else; every one returns a per-layer fp32 loss of shape [L].
"""
from .attention_kd import (
    attention_map_mse,
    attention_map_mse_reference,
    attention_prob_mse,
    attention_prob_mse_reference,
    attention_probs,
    attention_score_mse,
    attention_score_mse_reference,
    attention_scores,
)
from .layer_mse import layer_mse, layer_mse_reference

__all__ = [
    "attention_map_mse",
    "attention_map_mse_reference",
    "attention_prob_mse",
    "attention_prob_mse_reference",
    "attention_probs",
    "attention_score_mse",
    "attention_score_mse_reference",
    "attention_scores",
    "layer_mse",
    "layer_mse_reference",
]
