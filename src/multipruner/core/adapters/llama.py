"""Llama-style decoders: pre-norm attention and gated MLP, one norm per branch.

Covers llama, mistral, qwen2, qwen3 (its q/k norms live inside the attention module) and SmolLM2.
"""

from .base import ArchitectureAdapter, BranchNames

LLAMA = ArchitectureAdapter(
    family="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    attention=BranchNames(module="self_attn", norms=("input_layernorm",)),
    mlp=BranchNames(module="mlp", norms=("post_attention_layernorm",)),
)
