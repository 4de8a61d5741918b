"""Channel reordering: a permutation of channels that leaves the function unchanged.

After it, shrinking a width to ``w`` keeps the first ``w`` channels, i.e. drops the least important
groups. Two importances:

- ``l1`` (the reference's, the default): MLP channels by the summed L1 norms of their gate/up rows;
  attention units by the mean, over their query channels, of the L1 norms of the q row plus the k and v
  rows that channel attends with. Needs only the weights, so a plan records just the flag.
- ``activations`` (not in the paper): a channel's importance is the size of what it adds to the
  branch output on calibration text, ||x_c|| * ||W_out[:, c]|| (x_c: the channel's input to
  ``down_proj``/``o_proj`` over all tokens); a unit sums its channels. It depends on data, so the
  permutation itself is stored in the plan (``ChannelOrder``) and extraction replays it.

Scores are summed in float32. Equal scores keep ascending index order, except for float16 weights, where
they are ordered by descending index as the reference's float16 runs order them, so that a published
fp16 plan keeps the same channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapters import ArchitectureAdapter, HeadLayout, adapter_for
from ..errors import UsageError
from .projections import attention_rows, mlp_rows, permute_projection_rows, projection_weight

CHANNEL_IMPORTANCE = ("l1", "activations")


class ChannelOrderError(UsageError):
    """A stored channel order that does not fit the model."""


@dataclass(frozen=True)
class ChannelOrder:
    """Per layer, the dense model's MLP channels and attention units, most important first."""

    importance: str
    mlp: tuple[tuple[int, ...], ...]
    attention: tuple[tuple[int, ...], ...]

    def to_dict(self) -> dict:
        return {
            "importance": self.importance,
            "mlp": [list(o) for o in self.mlp],
            "attention": [list(o) for o in self.attention],
        }

    @classmethod
    def from_dict(cls, data: dict) -> ChannelOrder:
        try:
            return cls(
                importance=str(data["importance"]),
                mlp=tuple(tuple(int(i) for i in o) for o in data["mlp"]),
                attention=tuple(tuple(int(i) for i in o) for o in data["attention"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ChannelOrderError(f"malformed channel order in the plan: {err!r}") from None

    def check(self, num_layers: int, mlp_width: int, num_units: int) -> None:
        """Raise unless every layer's orders are permutations of the model's channels and units."""
        for name, orders, size in (("mlp", self.mlp, mlp_width), ("attention", self.attention, num_units)):
            if len(orders) != num_layers or any(sorted(o) != list(range(size)) for o in orders):
                raise ChannelOrderError(
                    f"the plan's {name} channel order is not a permutation of this model's {num_layers} x "
                    f"{size} {name} channels: the plan was made for another model"
                )


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


def reorder_mlp(mlp: nn.Module, adapter: ArchitectureAdapter, order: torch.Tensor | None = None) -> None:
    """Put ``order`` (default: the L1 order) first."""
    rows = _mlp_rows(mlp, adapter)
    order = mlp_channel_order(mlp, adapter) if order is None else order
    order = order.to(getattr(mlp, adapter.mlp_out_proj).weight.device)
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


def reorder_attention(
    attn: nn.Module, adapter: ArchitectureAdapter, heads: HeadLayout, units: torch.Tensor | None = None
) -> None:
    """Put the units ``units`` (default: the L1 order) first."""
    rows = _attention_rows(adapter, heads)
    units = attention_unit_order(attn, adapter, heads) if units is None else units
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
def reorder_weights(model: nn.Module, adapter: ArchitectureAdapter | None = None) -> None:
    """Reorder every layer's MLP channels and attention units in place, most important first."""
    adapter = adapter or adapter_for(model)
    heads = adapter.head_layout(model)
    for layer in adapter.layers(model):
        reorder_mlp(adapter.mlp_module(layer), adapter)
        reorder_attention(adapter.attention_module(layer), adapter, heads)


@torch.no_grad()
def apply_channel_order(
    model: nn.Module, order: ChannelOrder, adapter: ArchitectureAdapter | None = None
) -> None:
    """Reorder a dense model (not reordered before) in place by a stored order."""
    adapter = adapter or adapter_for(model)
    heads = adapter.head_layout(model)
    layers = adapter.layers(model)
    mlp_width = getattr(adapter.mlp_module(layers[0]), adapter.mlp_out_proj).in_features
    order.check(len(layers), mlp_width, heads.num_units)
    for layer, mlp_order, units in zip(layers, order.mlp, order.attention, strict=True):
        reorder_mlp(adapter.mlp_module(layer), adapter, torch.tensor(mlp_order))
        reorder_attention(adapter.attention_module(layer), adapter, heads, torch.tensor(units))


@torch.no_grad()
def activation_channel_order(
    model: nn.Module, tokens: torch.Tensor, batch_size: int = 1, adapter: ArchitectureAdapter | None = None
) -> ChannelOrder:
    """Order channels by the size of their contribution to the branch output on ``tokens`` [n, seqlen].

    Sums of squared inputs to each layer's ``down_proj`` and ``o_proj`` are accumulated in float64 by
    forward pre-hooks (memory: one vector per projection), then scaled by the output weight's column norms.
    """
    adapter = adapter or adapter_for(model)
    heads = adapter.head_layout(model)
    outputs = []
    for layer in adapter.layers(model):
        outputs.append(getattr(adapter.mlp_module(layer), adapter.mlp_out_proj))
        outputs.append(getattr(adapter.attention_module(layer), adapter.o_proj))
    squares: dict[int, torch.Tensor] = {}

    def accumulate(module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        squares[id(module)] = squares.get(id(module), 0) + (x * x).sum(dim=0)

    hooks = [linear.register_forward_pre_hook(accumulate) for linear in outputs]
    device = next(model.parameters()).device
    decoder = adapter.decoder(
        model
    )  # the LM head adds nothing to these inputs and costs most with big vocabularies
    try:
        for start in range(0, tokens.shape[0], batch_size):
            decoder(input_ids=tokens[start : start + batch_size].to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()

    def channel_scores(linear: nn.Linear) -> torch.Tensor:
        return squares[id(linear)].sqrt() * linear.weight.detach().double().norm(dim=0)

    def descending(scores: torch.Tensor) -> tuple[int, ...]:
        return tuple(torch.sort(scores.cpu(), descending=True, stable=True).indices.tolist())

    mlp_orders, attention_orders = [], []
    for mlp_out, o_proj in zip(outputs[0::2], outputs[1::2], strict=True):
        mlp_orders.append(descending(channel_scores(mlp_out)))
        attention_orders.append(descending(channel_scores(o_proj).view(heads.num_units, -1).sum(dim=1)))
    return ChannelOrder("activations", tuple(mlp_orders), tuple(attention_orders))


def calibration_channel_order(
    model: nn.Module,
    sets: dict[str, torch.Tensor],
    batch_size: int = 1,
    adapter: ArchitectureAdapter | None = None,
) -> ChannelOrder:
    """The order a search with ``--channel-importance activations`` uses: both calibration sets, the block
    set's sequences first. The same sets give the same order, so a plan can be replayed without it."""
    return activation_channel_order(model, torch.cat([sets["block"], sets["width"]]), batch_size, adapter)
