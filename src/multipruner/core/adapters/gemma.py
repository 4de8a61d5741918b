"""Gemma 2 and Gemma 3 text decoders: norms before *and after* each branch, sliding-window layers,
head_dim x heads that need not equal the hidden size, a scaled embedding; Gemma 2 soft-caps attention
and final logits, Gemma 3 has per-head q/k norms.

All of that lives inside HF's modules (the final soft-cap is applied by ``logits_from_hidden``); for
pruning only the branch norms differ from Llama, and they are the same in both generations.
"""

from .base import ArchitectureAdapter, BranchNames

GEMMA = ArchitectureAdapter(
    family="gemma",
    model_types=("gemma2", "gemma3_text"),
    attention=BranchNames(module="self_attn", norms=("input_layernorm", "post_attention_layernorm")),
    mlp=BranchNames(module="mlp", norms=("pre_feedforward_layernorm", "post_feedforward_layernorm")),
    branch_outputs_normed=True,
)
