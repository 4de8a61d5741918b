"""A model's cost measured on the model itself, under the measures the search counts (search/cost.py):
what a budget reached, and what the tests hold the counts to."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .model_size import count_params


@torch.inference_mode()
def _decode(model: nn.Module, context: int) -> tuple[object, FlopCounterMode]:
    """Decode the ``context``-th token of one sequence after a prefill of the others: its cache then holds
    ``context`` tokens (a sliding-window layer's, its window's last but one); and the FLOPs counted."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (1, context), generator=generator).to(next(model.parameters()).device)
    cache = model(input_ids=ids[:, :-1], use_cache=True).past_key_values if context > 1 else None
    with FlopCounterMode(display=False) as counter:
        out = model(input_ids=ids[:, -1:], cache=cache, use_cache=True)
    return out.past_key_values, counter


def decode_flops(model: nn.Module, context: int) -> int:
    """Matrix-multiply FLOPs torch counts for decoding the ``context``-th token of a sequence (eager
    attention, so the attention's products are counted as the matrix products they are)."""
    # a pruned model's layers each hold a copy of the config (modeling_multipruner), so every copy is set
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    previous = {key: config._attn_implementation for key, config in configs.items()}
    for config in configs.values():
        config._attn_implementation = "eager"
    try:
        return _decode(model, context)[1].get_total_flops()
    finally:
        for key, config in configs.items():
            config._attn_implementation = previous[key]


def kv_cache_bytes(model: nn.Module, context: int) -> int:
    """Bytes of the keys and values the model's cache holds after ``context`` tokens of one sequence
    (only those: model_size.cache_bytes counts every tensor of the cache, a sliding layer's bookkeeping too)."""
    cache = _decode(model, context)[0]
    return sum(
        tensor.numel() * tensor.element_size()
        for layer in cache.layers
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if isinstance(tensor, torch.Tensor)
    )


def saved_weight_bytes(directory: str | Path) -> int:
    """Bytes of the tensors in a saved model's safetensors files (a tied head is saved once)."""
    total = 0
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has keys(), no iteration
                view = f.get_slice(name)
                total += math.prod(view.get_shape()) * _SAFETENSORS_BYTES[view.get_dtype()]
    return total


_SAFETENSORS_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


def measured_cost(model: nn.Module, measure: str, context: int, saved_dir: str | Path | None = None) -> int:
    """The model's cost under ``measure`` (search/cost.py's names); weights-bytes reads ``saved_dir``."""
    if measure == "params":
        return count_params(model)
    if measure == "weights-bytes":
        if saved_dir is None:
            return sum(p.numel() * p.element_size() for p in model.parameters())
        return saved_weight_bytes(saved_dir)
    if measure == "flops":
        return decode_flops(model, context)
    if measure == "kv-bytes":
        return kv_cache_bytes(model, context)
    raise ValueError(f"unknown measure {measure!r}")
