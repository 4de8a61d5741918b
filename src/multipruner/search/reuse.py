"""Cross-step reuse: a candidate that comes back at the next step restarts from its own saved states.

Besides the per-step record of layer inputs, the scorer keeps, for each candidate, the hidden states its
last evaluation produced (within ``reuse_budget_mb``). When the candidate comes back at the next step,
those states stay valid up to the first layer where its new plan differs from its old one (the layer the
last step changed), so it restarts there instead of at its own layer. Every number is what a full
forward would compute: only work whose inputs are unchanged is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch

from ..core.plan import PruningPlan
from .tails import KeepRule, Tail

# candidate key -> (its plan, {batch: {layer index: hidden states entering that layer}})
SavedStates = dict[Hashable, tuple[PruningPlan, dict[int, dict[int, torch.Tensor]]]]


def first_difference(a: PruningPlan, b: PruningPlan) -> int:
    """The first layer where two plans build different modules (the number of layers if none)."""
    for i in range(a.num_layers):
        for kind in ("attention", "mlp"):
            removed = i in a.removed(kind)
            if removed != (i in b.removed(kind)) or (not removed and a.width(kind)[i] != b.width(kind)[i]):
                return i
    return a.num_layers


def keep_rule(
    budget_mb: float,
    num_layers: int,
    first_layers: Sequence[int],
    n_batches: int,
    state_mb: float,
) -> KeepRule:
    """Which layers' inputs to keep for reuse: all of them, or every k-th to stay within ``budget_mb``
    (``state_mb``: one batch's hidden states entering one layer)."""
    if budget_mb <= 0:
        return lambda index: False
    wanted = sum(num_layers - 1 - f for f in first_layers) * n_batches * state_mb
    stride = max(1, math.ceil(wanted / budget_mb))
    return lambda index: index % stride == 0


class StepReuse:
    """One step's side of the reuse: where each candidate's tail starts, and what it leaves for the next.

    ``keys[k]``: an identity of candidate k that stays the same across steps (None: nothing to reuse).
    """

    def __init__(
        self,
        saved: SavedStates,
        plans: Sequence[PruningPlan],
        first_layers: Sequence[int],
        keys: Sequence[Hashable | None],
        keep: KeepRule,
    ):
        self.plans, self.first_layers, self.keys, self.keep = plans, first_layers, keys, keep
        self.saved = {k: saved.get(k) for k in keys if k is not None}
        self.fresh: SavedStates = {
            k: (plan, {}) for k, plan in zip(keys, plans, strict=True) if k is not None
        }

    def tail_start(self, k: int, b: int, layer_inputs: Sequence[torch.Tensor | None]) -> Tail:
        """Candidate k's tail on batch b: from the recorded input of its own layer, or later from its
        states of the last step that are still valid."""
        plan, key = self.plans[k], self.keys[k]
        start, hidden, reusable = self.first_layers[k], layer_inputs[self.first_layers[k]], {}
        if self.saved.get(key) is not None:
            old_plan, old_states = self.saved[key]
            valid_until = first_difference(plan, old_plan)
            reusable = {m: h for m, h in old_states.get(b, {}).items() if m <= valid_until}
            if reusable and max(reusable) > start:
                start = max(reusable)
                hidden = reusable[start]
        return Tail(k, start, hidden, reusable)

    def keep_states(self, tail: Tail, b: int, kept: dict[int, torch.Tensor]) -> None:
        """Save what the tail leaves for the next step: the still-valid states it started from, and the
        layer inputs it kept on the way."""
        key = self.keys[tail.candidate]
        if key is not None:
            self.fresh[key][1][b] = {**{m: h for m, h in tail.reusable.items() if m <= tail.start}, **kept}
