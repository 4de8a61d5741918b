"""A candidate's *tail*: the decoder layers from the first one its plan changes to the last, run from the
recorded (or saved) hidden states entering that layer, one candidate after another.

A candidate that changes layer ``i`` leaves the hidden states entering layer ``i`` untouched, so only its
tail needs running. layer_major.py runs the same tails layer by layer instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from ..core.plan import PruningPlan
from ..core.surgery import PrunableModel
from .recorder import layer_output

# which layers' input states a tail keeps for the next step (reuse.keep_rule)
KeepRule = Callable[[int], bool]
# per tail: the candidate's final-normed hidden states and the layer inputs kept, by layer
TailResult = tuple[torch.Tensor, dict[int, torch.Tensor]]


class Tail(NamedTuple):
    candidate: int
    start: int  # the first layer to run
    hidden: torch.Tensor  # the states entering it
    reusable: dict[int, torch.Tensor]  # states saved at the last step that are still valid, by layer


def run_tail(
    prunable: PrunableModel, layer_kwargs: list[dict], hidden: torch.Tensor, start: int, keep: KeepRule
) -> tuple[torch.Tensor, dict[int, torch.Tensor], int]:
    """The final-normed hidden states from layer ``start`` on under the model's current plan, the layer
    inputs kept, and the number of layers run."""
    model, adapter = prunable.model, prunable.adapter
    kept: dict[int, torch.Tensor] = {}
    layers_run = 0
    for index in range(start, prunable.layout.num_layers):
        if index > start and keep(index):
            kept[index] = hidden
        hidden = layer_output(adapter.layers(model)[index](hidden, **layer_kwargs[index]))
        layers_run += 1
    return adapter.final_norm(model)(hidden), kept, layers_run


def run_tails_one_by_one(
    prunable: PrunableModel,
    layer_kwargs: list[dict],
    tails: Sequence[Tail],
    plans: Sequence[PruningPlan],
    keep: KeepRule,
) -> tuple[list[TailResult], int]:
    """Each tail under its candidate's plan, candidate by candidate; and the number of layers run."""
    results, layers_run = [], 0
    for k, start, hidden, _ in tails:
        with prunable.trial(plans[k]):
            normed, kept, ran = run_tail(prunable, layer_kwargs, hidden, start, keep)
        results.append((normed, kept))
        layers_run += ran
    return results, layers_run
