"""Weight reordering by L1 importance: a permutation of channels that leaves the function unchanged.

After it, shrinking a width to ``w`` keeps the first ``w`` channels, i.e. drops the least important
groups. Scores follow the reference: MLP channels by the summed L1 norms of their gate/up rows;
attention units by the mean, over their query channels, of the L1 norms of the q row plus the k and v
rows that channel attends with.

Scores are summed in float32. Equal scores keep ascending index order, except for float16 weights, where
they are ordered by descending index as the reference's float16 runs order them, so that a published
fp16 plan keeps the same channels.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import ArchitectureAdapter, HeadLayout, adapter_for
from .projections import attention_rows, mlp_rows, permute_projection_rows, projection_weight


def _permute_columns(linear: nn.Linear, index: torch.Tensor) -> None:
    linear.weight.data = linear.weight.data.index_select(1, index)


def _permute_norm(norm: nn.Module, index: torch.Tensor) -> None:
    norm.weight.data = norm.weight.data.index_select(0, index)


def _row_l1(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().abs().sum(dim=1)


def _most_important_first(scores: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if weight.dtype != torch.float16:
        return torch.sort(scores, descending=True, stable=True).indices
    # ties by descending index: a stable sort of the reversed scores, mapped back
    return scores.numel() - 1 - torch.sort(scores.flip(0), descending=True, stable=True).indices


def _mlp_rows(mlp: nn.Module, adapter: ArchitectureAdapter) -> dict[str, int]:
    return mlp_rows(adapter, getattr(mlp, adapter.mlp_out_proj).in_features)


def mlp_channel_order(mlp: nn.Module, adapter: ArchitectureAdapter) -> torch.Tensor:
    rows = _mlp_rows(mlp, adapter)
    scores = sum(_row_l1(projection_weight(mlp, adapter, name, rows)) for name in adapter.mlp_in_projs)
    return _most_important_first(scores, getattr(mlp, adapter.mlp_out_proj).weight)


def reorder_mlp(mlp: nn.Module, adapter: ArchitectureAdapter) -> None:
    rows = _mlp_rows(mlp, adapter)
    order = mlp_channel_order(mlp, adapter).to(getattr(mlp, adapter.mlp_out_proj).weight.device)
    for name in adapter.mlp_in_projs:
        permute_projection_rows(mlp, adapter, name, order, rows)
    _permute_columns(getattr(mlp, adapter.mlp_out_proj), order)


def _attention_rows(adapter: ArchitectureAdapter, heads: HeadLayout) -> dict[str, int]:
    return attention_rows(adapter, heads.q_width, heads.num_kv_heads * heads.head_dim)


def attention_unit_order(attn: nn.Module, adapter: ArchitectureAdapter, heads: HeadLayout) -> torch.Tensor:
    """Units (see HeadLayout) sorted by importance, most important first."""
    d, rows = heads.head_dim, _attention_rows(adapter, heads)
    l1 = {name: _row_l1(projection_weight(attn, adapter, name, rows)) for name in rows}
    q = l1[adapter.q_proj].view(heads.num_heads, d)
    kv = (l1[adapter.k_proj] + l1[adapter.v_proj]).view(heads.num_kv_heads, d)
    per_channel = q + kv.repeat_interleave(heads.n_rep, dim=0)  # query head h attends with KV head h // n_rep
    per_unit = per_channel.view(heads.num_units, -1).mean(dim=1)
    return _most_important_first(per_unit, getattr(attn, adapter.o_proj).weight)


def _expand(unit_order: torch.Tensor, block: int) -> torch.Tensor:
    """Unit indices -> channel indices, ``block`` channels per unit."""
    return (unit_order[:, None] * block + torch.arange(block, device=unit_order.device)).reshape(-1)


def reorder_attention(attn: nn.Module, adapter: ArchitectureAdapter, heads: HeadLayout) -> None:
    rows = _attention_rows(adapter, heads)
    units = attention_unit_order(attn, adapter, heads).to(getattr(attn, adapter.o_proj).weight.device)
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
def reorder_weights(model: nn.Module, adapter: ArchitectureAdapter | None = None) -> None:
    """Reorder every layer's MLP channels and attention units in place, most important first."""
    adapter = adapter or adapter_for(model)
    heads = adapter.head_layout(model)
    for layer in adapter.layers(model):
        reorder_mlp(adapter.mlp_module(layer), adapter)
        reorder_attention(adapter.attention_module(layer), adapter, heads)
