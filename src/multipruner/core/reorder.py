"""Channel reordering: a permutation of channels that leaves the function unchanged.

After it, shrinking a width to ``w`` keeps the first ``w`` channels, i.e. drops the least important
groups. The permutation is a ranking by some channel importance (``importance``: ``activations``, the
search's default, or ``l1``); this module only applies it to the weights.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import ArchitectureAdapter, HeadLayout, adapter_for
from .importance import ChannelOrder, l1_channel_order
from .projections import attention_rows, mlp_rows, permute_projection_rows


def _permute_columns(linear: nn.Linear, index: torch.Tensor) -> None:
    linear.weight.data = linear.weight.data.index_select(1, index)


def _permute_norm(norm: nn.Module, index: torch.Tensor) -> None:
    norm.weight.data = norm.weight.data.index_select(0, index)


def reorder_mlp(mlp: nn.Module, adapter: ArchitectureAdapter, order: torch.Tensor) -> None:
    """Put the channels ``order`` first."""
    rows = mlp_rows(adapter, getattr(mlp, adapter.mlp_out_proj).in_features)
    order = order.to(getattr(mlp, adapter.mlp_out_proj).weight.device)
    for name in adapter.mlp_in_projs:
        permute_projection_rows(mlp, adapter, name, order, rows)
    _permute_columns(getattr(mlp, adapter.mlp_out_proj), order)


def _expand(unit_order: torch.Tensor, block: int) -> torch.Tensor:
    """Unit indices -> channel indices, ``block`` channels per unit."""
    return (unit_order[:, None] * block + torch.arange(block, device=unit_order.device)).reshape(-1)


def reorder_attention(
    attn: nn.Module, adapter: ArchitectureAdapter, heads: HeadLayout, units: torch.Tensor
) -> None:
    """Put the units (see HeadLayout) ``units`` first."""
    rows = attention_rows(adapter, heads.q_width, heads.num_kv_heads * heads.head_dim)
    units = units.to(getattr(attn, adapter.o_proj).weight.device)
    q_index = _expand(units, heads.unit_channels)
    permute_projection_rows(attn, adapter, adapter.q_proj, q_index, rows)
    _permute_columns(getattr(attn, adapter.o_proj), q_index)
    for name in adapter.q_row_norms:
        _permute_norm(getattr(attn, name), q_index)
    if heads.kv_heads_per_unit:
        kv_index = _expand(units, heads.head_dim)
        permute_projection_rows(attn, adapter, adapter.k_proj, kv_index, rows)
        permute_projection_rows(attn, adapter, adapter.v_proj, kv_index, rows)
        for name in adapter.k_row_norms:
            _permute_norm(getattr(attn, name), kv_index)


@torch.no_grad()
def apply_channel_order(
    model: nn.Module, order: ChannelOrder, adapter: ArchitectureAdapter | None = None
) -> None:
    """Reorder a dense model (not reordered before) in place by a ranking, most important first."""
    adapter = adapter or adapter_for(model)
    heads = adapter.head_layout(model)
    layers = adapter.layers(model)
    mlp_width = getattr(adapter.mlp_module(layers[0]), adapter.mlp_out_proj).in_features
    order.check(len(layers), mlp_width, heads.num_units)
    for layer, mlp_order, units in zip(layers, order.mlp, order.attention, strict=True):
        reorder_mlp(adapter.mlp_module(layer), adapter, torch.tensor(mlp_order))
        reorder_attention(adapter.attention_module(layer), adapter, heads, torch.tensor(units))


def reorder_weights(model: nn.Module, adapter: ArchitectureAdapter | None = None) -> None:
    """Reorder every layer's MLP channels and attention units in place by their L1 importance."""
    adapter = adapter or adapter_for(model)
    apply_channel_order(model, l1_channel_order(model, adapter), adapter)
