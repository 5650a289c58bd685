"""Fused Triton kernels for the KD loss, each beside its one PyTorch reference.

Each functional alias (`layer_mse`, `attention_map_mse`, `attention_score_mse`,
`attention_prob_mse`) runs its Triton kernel on CUDA tensors or under TRITON_INTERPRET=1, and its
reference everywhere else; every one returns a per-layer fp32 loss of shape [L].
"""
# Run from the repository root, this folder is also importable as a top-level `kernels` (the
# root is on sys.path), and transformers imports a `kernels` it finds, probing for the Hub's
# package of that name. Loading the kernel modules a second time would register the
# xlmr_mini::* custom ops again, rebinding them to the copy: only the installed name loads them.
if __name__ == "xlmr_mini.kernels":
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
