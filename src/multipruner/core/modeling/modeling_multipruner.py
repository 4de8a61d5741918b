"""Model code saved next to every checkpoint that multipruner writes.

It depends only on torch and transformers, so ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` works with an unmodified transformers. A pruned model is the stock model of
its family with per-layer sizes: each layer's attention and MLP are rebuilt from a copy of the config
with that layer's head counts and intermediate size, and removed branches become stand-ins that add
nothing, hold no weights and keep no KV cache. No forward of transformers is copied.

The config carries ``pruned_structure``::

    {"attention_module": "self_attn", "mlp_module": "mlp",
     "attention_norms": ["input_layernorm"], "mlp_norms": ["post_attention_layernorm"],
     "layers": [{"attention": {"num_heads": 6, "num_kv_heads": 2} | null,
                 "mlp": {"intermediate_size": 1280} | null}, ...]}
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import (
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    Olmo2ForCausalLM,
    Phi3ForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)
from transformers.cache_utils import DummyLayer, DynamicCache


class RemovedAttention(nn.Module):
    """A removed attention branch: the residual stream passes through unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


class RemovedMLP(nn.Module):
    """A removed MLP branch: the residual stream passes through unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return torch.zeros_like(hidden_states)


class RemovedNorm(nn.Module):
    """The norm of a removed branch: it only ever sees the branch's zero output or feeds a removed module."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states


def layer_config(config, attention: dict | None, mlp: dict | None):
    """A shallow copy of the (text) config with one layer's sizes."""
    cfg = copy.copy(config)
    if attention is not None:
        cfg.num_attention_heads = attention["num_heads"]
        cfg.num_key_value_heads = attention["num_kv_heads"]
    if mlp is not None:
        cfg.intermediate_size = mlp["intermediate_size"]
    return cfg


def remove_branch(layer: nn.Module, module_name: str, norm_names, stand_in: nn.Module) -> None:
    setattr(layer, module_name, stand_in)
    for name in norm_names:
        setattr(layer, name, RemovedNorm())


def resize_layers(layers: nn.ModuleList, config, structure: dict) -> None:
    """Give every layer the sizes in ``structure``; build modules only where they differ."""
    attn_name, mlp_name = structure["attention_module"], structure["mlp_module"]
    for idx, (layer, spec) in enumerate(zip(layers, structure["layers"], strict=True)):
        attn_spec, mlp_spec = spec["attention"], spec["mlp"]
        cfg = layer_config(config, attn_spec, mlp_spec)
        if attn_spec is None:
            remove_branch(layer, attn_name, structure["attention_norms"], RemovedAttention())
        elif (attn_spec["num_heads"], attn_spec["num_kv_heads"]) != (
            config.num_attention_heads,
            config.num_key_value_heads,
        ):
            setattr(layer, attn_name, type(getattr(layer, attn_name))(cfg, idx))
        if mlp_spec is None:
            remove_branch(layer, mlp_name, structure["mlp_norms"], RemovedMLP())
        elif mlp_spec["intermediate_size"] != config.intermediate_size:
            setattr(layer, mlp_name, type(getattr(layer, mlp_name))(cfg))


def removed_attention_layers(structure: dict) -> list[int]:
    return [i for i, spec in enumerate(structure["layers"]) if spec["attention"] is None]


def make_cache_skip_layers(cache, config, removed: list[int]) -> None:
    """Give removed-attention layers a cache layer that stores nothing.

    Transformers reads the sequence length from the first attention layer of the cache; an empty slot
    for a removed layer 0 would reset positions to 0 during generation.
    """
    if not isinstance(cache, DynamicCache) or not removed:
        return
    layers = cache.layers
    if len(layers) < config.num_hidden_layers:
        template = DynamicCache(config=config).layers
        layers.extend(template[len(layers) :])
    for idx in removed:
        slot = layers[idx]
        if not isinstance(slot, DummyLayer) and slot.get_seq_length() == 0:
            layers[idx] = SkippedAttentionLayer(cache)


class SkippedAttentionLayer(DummyLayer):
    """A removed attention layer's cache slot: stores nothing, and reports the sequence length of the
    cache's first kept attention layer: transformers 5.25's ``DynamicCache.get_seq_length`` asks layer 0,
    removed or not, and a plain ``DummyLayer`` has no ``get_seq_length``."""

    def __init__(self, cache):
        super().__init__()
        self._cache = cache

    def get_seq_length(self) -> int:
        for layer in self._cache.layers:
            if not isinstance(layer, DummyLayer):
                return layer.get_seq_length()
        return 0


class PrunedCausalLMMixin:
    """Resizes the stock model's layers after it is built; fixes up the KV cache on each call."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        resize_layers(self.model.layers, config, config.pruned_structure)

    def forward(self, *args, **kwargs):
        # transformers 5.24 renamed ``past_key_values`` to ``cache``; earlier 5.x only knows the old name
        for name in ("cache", "past_key_values"):
            if kwargs.get(name) is not None:
                make_cache_skip_layers(
                    kwargs[name], self.config, removed_attention_layers(self.config.pruned_structure)
                )
        return super().forward(*args, **kwargs)


# The config stays the family's own class (model_type unchanged, plus ``pruned_structure``), so
# AutoConfig and AutoTokenizer load it without remote code; only the model class comes from this file.
class MultiPrunerLlamaForCausalLM(PrunedCausalLMMixin, LlamaForCausalLM):
    pass


class MultiPrunerMistralForCausalLM(PrunedCausalLMMixin, MistralForCausalLM):
    pass


class MultiPrunerQwen2ForCausalLM(PrunedCausalLMMixin, Qwen2ForCausalLM):
    pass


class MultiPrunerQwen3ForCausalLM(PrunedCausalLMMixin, Qwen3ForCausalLM):
    pass


class MultiPrunerGemma2ForCausalLM(PrunedCausalLMMixin, Gemma2ForCausalLM):
    pass


class MultiPrunerGemma3ForCausalLM(PrunedCausalLMMixin, Gemma3ForCausalLM):
    pass


class MultiPrunerOlmo2ForCausalLM(PrunedCausalLMMixin, Olmo2ForCausalLM):
    pass


class MultiPrunerPhi3ForCausalLM(PrunedCausalLMMixin, Phi3ForCausalLM):
    pass


# model_type of the dense family -> pruned model class. The same types as multipruner's adapter registry
# (core/adapters), which this file cannot import: tests/test_plan.py checks that the two agree.
PRUNED_CLASSES = {
    "llama": MultiPrunerLlamaForCausalLM,
    "mistral": MultiPrunerMistralForCausalLM,
    "qwen2": MultiPrunerQwen2ForCausalLM,
    "qwen3": MultiPrunerQwen3ForCausalLM,
    "gemma2": MultiPrunerGemma2ForCausalLM,
    "gemma3_text": MultiPrunerGemma3ForCausalLM,
    "olmo2": MultiPrunerOlmo2ForCausalLM,
    "phi3": MultiPrunerPhi3ForCausalLM,
}
