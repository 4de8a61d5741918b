"""Gemma 3 text decoders: MQA/GQA with per-head q/k norms, norms before *and after* each branch,
sliding-window layers, head_dim x heads that need not equal the hidden size, a scaled embedding.

All of that lives inside HF's modules; for pruning only the branch norms differ from Llama.
"""

from .base import ArchitectureAdapter, BranchNames

GEMMA3 = ArchitectureAdapter(
    family="gemma3",
    model_types=("gemma3_text",),
    attention=BranchNames(module="self_attn", norms=("input_layernorm", "post_attention_layernorm")),
    mlp=BranchNames(module="mlp", norms=("pre_feedforward_layernorm", "post_feedforward_layernorm")),
)
