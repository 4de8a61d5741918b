"""Apply a pruning plan to a live model, reversibly and without copying weights.

A removed branch is swapped for a stand-in module (the same ones a saved pruned model uses); a narrower
width replaces a projection's weight by a *view* of the first channels of the full weight (a copy for a
fused linear such as Phi-3's ``qkv_proj``, whose kept rows are not contiguous). Switching
plans only touches the layers that differ, so the search can try thousands of candidates cheaply, and
a masked model has exactly the modules and parameter names of the extracted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import ArchitectureAdapter, adapter_for
from .importance import ChannelOrder
from .layout import ModelLayout, layout_of
from .modeling.modeling_multipruner import RemovedAttention, RemovedMLP, RemovedNorm
from .plan import PruningPlan
from .projections import attention_rows, first_rows, mlp_rows
from .reorder import apply_channel_order, reorder_weights


@dataclass
class _Branch:
    """The original modules of one branch of one layer, kept so any plan can be undone."""

    module: nn.Module
    norms: dict[str, nn.Module]
    params: dict[str, tuple[nn.Parameter, nn.Parameter | None]]  # projection -> (weight, bias)
    row_norms: dict[str, nn.Parameter]  # norm inside the module over a whole projection -> its weight


def _set_linear(linear: nn.Linear, weight, bias) -> None:
    linear.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
    linear.out_features, linear.in_features = linear.weight.shape


class PrunableModel:
    """A dense model plus the plan currently applied to it."""

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter | None = None):
        self.model = model
        self.adapter = adapter or adapter_for(model)
        self.layout: ModelLayout = layout_of(model, self.adapter)
        self.heads = self.adapter.head_layout(model)
        a = self.adapter
        self._attention: list[_Branch] = []
        self._mlp: list[_Branch] = []
        for layer in a.layers(model):
            attn, mlp = a.attention_module(layer), a.mlp_module(layer)
            self._attention.append(
                _Branch(
                    attn,
                    {n: getattr(layer, n) for n in a.attention.norms},
                    self._params(attn, a.linears("attention")),
                    {n: getattr(attn, n).weight for n in (*a.q_row_norms, *a.k_row_norms)},
                )
            )
            self._mlp.append(
                _Branch(
                    mlp,
                    {n: getattr(layer, n) for n in a.mlp.norms},
                    self._params(mlp, a.linears("mlp")),
                    {},
                )
            )
        self.plan = PruningPlan.dense(self.layout)
        self.channel_order: ChannelOrder | None = None  # set when the channels were ordered by data

    @classmethod
    def prepare(
        cls, model: nn.Module, weight_reorder: bool = True, channel_order: ChannelOrder | None = None
    ) -> PrunableModel:
        """Wrap a dense model for pruning, reordering its weights first when asked (in place): by
        ``channel_order`` when given (channels ordered by data), else by L1 norms."""
        adapter = adapter_for(model)
        if weight_reorder and channel_order is None:
            reorder_weights(model, adapter)
        prunable = cls(model, adapter)
        if weight_reorder and channel_order is not None:
            prunable.order_channels(channel_order)
        return prunable

    @classmethod
    def from_plan(cls, model: nn.Module, plan: PruningPlan) -> PrunableModel:
        """The dense model prepared the way ``plan`` was searched: its reordering and channel order."""
        return cls.prepare(model, plan.weight_reorder, plan.channel_order)

    def order_channels(self, order: ChannelOrder) -> None:
        """Reorder the dense, not yet reordered model's channels by a stored order (in place)."""
        if self.channel_order is not None or self.plan != PruningPlan.dense(self.layout):
            raise RuntimeError("internal error: channels can only be ordered once, on the dense model")
        apply_channel_order(self.model, order, self.adapter)
        self.channel_order = order

    @staticmethod
    def _params(module: nn.Module, names) -> dict:
        return {n: (getattr(module, n).weight, getattr(module, n).bias) for n in names}

    # --- per-branch state ---------------------------------------------------------
    def _set_present(self, kind: str, layer_idx: int, present: bool) -> None:
        layer = self.adapter.layers(self.model)[layer_idx]
        branch = (self._attention if kind == "attention" else self._mlp)[layer_idx]
        names = self.adapter.branch(kind)
        if present:
            setattr(layer, names.module, branch.module)
            for n, norm in branch.norms.items():
                setattr(layer, n, norm)
        else:
            setattr(layer, names.module, RemovedAttention() if kind == "attention" else RemovedMLP())
            for n in branch.norms:
                setattr(layer, n, RemovedNorm())

    # a fused projection's kept rows are a new tensor: made in a scorer's inference mode it would be an
    # inference tensor, which a later extraction in the same process cannot load into a model
    @torch.inference_mode(False)
    def _set_width(self, kind: str, layer_idx: int, full: dict[str, int], kept: dict[str, int]) -> None:
        """Keep the first ``kept[p]`` rows of each input projection ``p`` and the matching output columns."""
        a = self.adapter
        branch = (self._attention if kind == "attention" else self._mlp)[layer_idx]
        *inputs, output = a.linears(kind)
        for name in inputs:
            weight, bias = branch.params[name]
            _set_linear(
                getattr(branch.module, name), *first_rows(weight, bias, a.fused_linear(name), full, kept)
            )
        weight, bias = branch.params[output]
        _set_linear(getattr(branch.module, output), weight[:, : kept[a.input_projections(kind)[0]]], bias)

    def _set_attention_width(self, layer_idx: int, q_width: int) -> None:
        a, heads = self.adapter, self.heads
        self._set_width(
            "attention", layer_idx, self._attention_rows(heads.q_width), self._attention_rows(q_width)
        )
        branch = self._attention[layer_idx]
        kv_width = heads.kv_width(q_width)
        for names, rows in ((a.q_row_norms, q_width), (a.k_row_norms, kv_width)):
            for name in names:
                getattr(branch.module, name).weight = nn.Parameter(
                    branch.row_norms[name][:rows], requires_grad=False
                )
        self._set_head_counts(branch.module, q_width)

    def _attention_rows(self, q_width: int) -> dict[str, int]:
        return attention_rows(self.adapter, q_width, self.heads.kv_width(q_width))

    def _set_head_counts(self, attn: nn.Module, q_width: int) -> None:
        heads = self.heads
        self.adapter.set_head_counts(
            attn,
            q_width // heads.head_dim,
            heads.kv_width(q_width) // heads.head_dim,
            heads.num_kv_groups(q_width),
        )

    def _set_mlp_width(self, layer_idx: int, width: int) -> None:
        a = self.adapter
        self._set_width("mlp", layer_idx, mlp_rows(a, self.layout.mlp_width), mlp_rows(a, width))

    def _full_or_view(self, kind: str, layer_idx: int, width: int) -> None:
        full = self.layout.attention_width if kind == "attention" else self.layout.mlp_width
        setter = self._set_attention_width if kind == "attention" else self._set_mlp_width
        if width == full:
            # the original Parameter objects, not views of them
            branch = (self._attention if kind == "attention" else self._mlp)[layer_idx]
            for name, (weight, bias) in branch.params.items():
                _set_linear(getattr(branch.module, name), weight, bias)
            for name, weight in branch.row_norms.items():
                getattr(branch.module, name).weight = weight
            if kind == "attention":
                self._set_head_counts(branch.module, self.heads.q_width)
        else:
            setter(layer_idx, width)

    # --- plans --------------------------------------------------------------------
    def apply(self, plan: PruningPlan) -> None:
        """Make the model compute ``plan``; only layers that differ from the current plan are touched.
        A plan that does not fit the model is refused (PlanError) before anything changes."""
        plan.check_fits(self.layout)
        old = self.plan
        for kind in ("attention", "mlp"):
            for i in range(self.layout.num_layers):
                was_present, present = i not in old.removed(kind), i not in plan.removed(kind)
                if was_present != present:
                    self._set_present(kind, i, present)
                if old.width(kind)[i] != plan.width(kind)[i]:
                    self._full_or_view(kind, i, plan.width(kind)[i])
        self.plan = plan

    def restore(self) -> None:
        self.apply(PruningPlan.dense(self.layout))

    @contextmanager
    def trial(self, plan: PruningPlan) -> Iterator[None]:
        """Apply ``plan`` for the duration of the block, then go back to the previous plan."""
        previous = self.plan
        self.apply(plan)
        try:
            yield
        finally:
            self.apply(previous)
