"""Phi-3 decoders: Llama's layout with q/k/v in one ``qkv_proj`` and gate/up in one ``gate_up_proj``.

The fused linears are data (``fused``). One behaviour differs: Phi-3's attention finds where the keys
start in ``qkv_proj`` from ``config.num_attention_heads`` and ``self.num_key_value_heads``, so a
narrowed attention module needs its own copy of the config with its head counts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from .base import ArchitectureAdapter, BranchNames, FusedLinear


@dataclass(frozen=True)
class Phi3Adapter(ArchitectureAdapter):
    def set_head_counts(self, attn: nn.Module, num_heads: int, num_kv_heads: int, num_kv_groups: int) -> None:
        super().set_head_counts(attn, num_heads, num_kv_heads, num_kv_groups)
        attn.num_key_value_heads = num_kv_heads
        if (attn.config.num_attention_heads, attn.config.num_key_value_heads) != (num_heads, num_kv_heads):
            attn.config = copy.copy(attn.config)  # the model's config is shared by every layer
            attn.config.num_attention_heads, attn.config.num_key_value_heads = num_heads, num_kv_heads


PHI3 = Phi3Adapter(
    family="phi3",
    model_types=("phi3",),
    attention=BranchNames(module="self_attn", norms=("input_layernorm",)),
    mlp=BranchNames(module="mlp", norms=("post_attention_layernorm",)),
    fused=(
        FusedLinear("qkv_proj", ("q_proj", "k_proj", "v_proj")),
        FusedLinear("gate_up_proj", ("gate_proj", "up_proj")),
    ),
)
