"""Channel importance: how a layer's MLP channels and attention units are ranked, chosen by name.

An importance only ranks; ``reorder`` applies a ranking to the weights (a permutation that leaves the
function unchanged), after which shrinking a width to ``w`` keeps the first ``w`` channels. Two:

- ``activations`` (the default; not in the paper): a channel's importance is the size of what it adds to
  the branch output on calibration text, ||x_c|| * ||W_out[:, c]|| (x_c: the channel's input to
  ``down_proj``/``o_proj`` over all tokens); a unit sums its channels. It depends on data, so the
  permutation itself is stored in the plan (``ChannelOrder``) and extraction replays it.
- ``l1`` (the reference's): MLP channels by the summed L1 norms of their gate/up rows; attention units
  by the mean, over their query channels, of the L1 norms of the q row plus the k and v rows that channel
  attends with. Needs only the weights, so a plan records just ``weight_reorder`` and the order is
  recomputed wherever the plan is used.

L1 scores are summed in float32. Equal scores keep ascending index order, except for float16 weights,
where they are ordered by descending index as the reference's float16 runs order them, so that a
published fp16 plan keeps the same channels.

A new importance is one class beside these two, added to ``CHANNEL_IMPORTANCE``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError
from .adapters import ArchitectureAdapter, HeadLayout, adapter_for
from .projections import attention_rows, mlp_rows, projection_weight


class ChannelOrderError(UsageError):
    """A stored channel order that does not fit the model."""


@dataclass(frozen=True)
class ChannelOrder:
    """Per layer, the dense model's MLP channels and attention units, most important first."""

    importance: str
    mlp: tuple[tuple[int, ...], ...]
    attention: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        """Each layer's order lists every channel (unit) once, and all layers have as many."""
        if len(self.mlp) != len(self.attention):
            raise ChannelOrderError(
                f"the plan's channel order has {len(self.mlp)} MLP but {len(self.attention)} attention layers"
            )
        for name, orders in (("mlp", self.mlp), ("attention", self.attention)):
            size = len(orders[0]) if orders else 0
            for i, order in enumerate(orders):
                if sorted(order) != list(range(size)):
                    raise ChannelOrderError(
                        f"the plan's {name} channel order is not a permutation: layer {i} does not list each "
                        f"of the {size} {name} channels of layer 0 once"
                    )

    def to_dict(self) -> dict:
        return {
            "importance": self.importance,
            "mlp": [list(o) for o in self.mlp],
            "attention": [list(o) for o in self.attention],
        }

    @classmethod
    def from_dict(cls, data: dict) -> ChannelOrder:
        try:
            importance = str(data["importance"])
            mlp = tuple(tuple(int(i) for i in o) for o in data["mlp"])
            attention = tuple(tuple(int(i) for i in o) for o in data["attention"])
        except (KeyError, TypeError, ValueError) as err:
            raise ChannelOrderError(f"malformed channel order in the plan: {err!r}") from None
        return cls(importance, mlp, attention)

    def check(self, num_layers: int, mlp_width: int, num_units: int) -> None:
        """Raise unless every layer's orders are permutations of the model's channels and units (each is a
        permutation of its own length, checked when built, so the lengths tell)."""
        for name, orders, size in (("mlp", self.mlp, mlp_width), ("attention", self.attention, num_units)):
            if len(orders) != num_layers or (orders and len(orders[0]) != size):
                raise ChannelOrderError(
                    f"the plan's {name} channel order is not a permutation of this model's {num_layers} x "
                    f"{size} {name} channels: the plan was made for another model"
                )


# --- l1: the weights' norms ---------------------------------------------------------------------
def _row_l1(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().abs().sum(dim=1)


def _most_important_first(scores: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if weight.dtype != torch.float16:
        return torch.sort(scores, descending=True, stable=True).indices
    # ties by descending index: a stable sort of the reversed scores, mapped back
    return scores.numel() - 1 - torch.sort(scores.flip(0), descending=True, stable=True).indices


def mlp_channel_order(mlp: nn.Module, adapter: ArchitectureAdapter) -> torch.Tensor:
    """One layer's MLP channels by the L1 norms of their input rows, most important first."""
    rows = mlp_rows(adapter, getattr(mlp, adapter.mlp_out_proj).in_features)
    scores = sum(_row_l1(projection_weight(mlp, adapter, name, rows)) for name in adapter.mlp_in_projs)
    return _most_important_first(scores, getattr(mlp, adapter.mlp_out_proj).weight)


def attention_unit_order(attn: nn.Module, adapter: ArchitectureAdapter, heads: HeadLayout) -> torch.Tensor:
    """One layer's attention units (see HeadLayout) by the L1 norms of their rows, most important first."""
    d, rows = heads.head_dim, attention_rows(adapter, heads.q_width, heads.num_kv_heads * heads.head_dim)
    l1 = {name: _row_l1(projection_weight(attn, adapter, name, rows)) for name in rows}
    q = l1[adapter.q_proj].view(heads.num_heads, d)
    kv = (l1[adapter.k_proj] + l1[adapter.v_proj]).view(heads.num_kv_heads, d)
    per_channel = q + kv.repeat_interleave(heads.n_rep, dim=0)  # query head h attends with KV head h // n_rep
    per_unit = per_channel.view(heads.num_units, -1).mean(dim=1)
    return _most_important_first(per_unit, getattr(attn, adapter.o_proj).weight)


@torch.no_grad()
def l1_channel_order(model: nn.Module, adapter: ArchitectureAdapter | None = None) -> ChannelOrder:
    """Every layer's L1 order (each layer's from its own weights, so layers do not affect each other)."""
    adapter = adapter or adapter_for(model)
    heads = adapter.head_layout(model)
    layers = adapter.layers(model)
    return ChannelOrder(
        "l1",
        tuple(tuple(mlp_channel_order(adapter.mlp_module(layer), adapter).tolist()) for layer in layers),
        tuple(
            tuple(attention_unit_order(adapter.attention_module(layer), adapter, heads).tolist())
            for layer in layers
        ),
    )


# --- activations: each channel's contribution on calibration text ------------------------------
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
    # the decoder only: the LM head adds nothing to these inputs and costs most with big vocabularies
    decoder = adapter.decoder(model)
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


# --- the registry -------------------------------------------------------------------------------
class ChannelImportance:
    """Ranks every layer's MLP channels and attention units of a dense model, most important first.

    ``needs_calibration``: the ranking reads calibration text, so it waits for the calibration sets,
    and a plan stores the resulting permutation (it cannot be recomputed from the weights alone).
    """

    name: str
    needs_calibration: bool

    def order(
        self,
        model: nn.Module,
        calibration: dict[str, torch.Tensor] | None = None,
        batch_size: int = 1,
        adapter: ArchitectureAdapter | None = None,
    ) -> ChannelOrder:
        """The ranking; ``calibration`` is the search's calibration sets ({"block": ids, "width": ids})."""
        raise NotImplementedError


class L1Importance(ChannelImportance):
    name, needs_calibration = "l1", False

    def order(self, model, calibration=None, batch_size=1, adapter=None) -> ChannelOrder:
        return l1_channel_order(model, adapter)


class ActivationImportance(ChannelImportance):
    name, needs_calibration = "activations", True

    def order(self, model, calibration=None, batch_size=1, adapter=None) -> ChannelOrder:
        """Both calibration sets, the block set's sequences first: the same sets give the same order, so
        a plan searched this way can have its order recomputed (``extract --activation-order``)."""
        if calibration is None:
            raise ValueError("internal error: ordering channels by activations needs the calibration sets")
        tokens = torch.cat([calibration["block"], calibration["width"]])
        return activation_channel_order(model, tokens, batch_size, adapter)


CHANNEL_IMPORTANCE: dict[str, ChannelImportance] = {
    importance.name: importance for importance in (L1Importance(), ActivationImportance())
}
