"""Layer-major scoring: the candidates' tails (tails.py) run layer by layer instead of candidate by candidate.

A candidate changes only its own layer, so past it every candidate's tail runs the current plan's
modules: at each layer, the hidden states of all candidates already past their own layer are
concatenated along the batch and go through that layer in one call (chunked by a memory budget); a
candidate's own layer runs alone, under its plan. Fewer, larger calls; the same layer forwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.layout import ModelLayout
from ..core.plan import PruningPlan
from ..core.surgery import PrunableModel
from .recorder import layer_output
from .tails import KeepRule, Tail, TailResult


def activation_width(layout: ModelLayout) -> int:
    """Widest per-token activation inside a layer (hidden, MLP intermediate, or q/k/v rows)."""
    return max(
        layout.hidden_size,
        2 * layout.mlp_width,
        layout.attention_width + 2 * layout.num_kv_heads * layout.head_dim,
    )


def candidates_per_call(
    layout: ModelLayout, batch_shape: torch.Size, dtype_bytes: int, budget_mb: float
) -> int:
    """How many candidates' states one layer call takes within ``budget_mb`` of activations (at least 1)."""
    per_candidate_mb = batch_shape[0] * batch_shape[1] * activation_width(layout) * dtype_bytes / 2**20
    return max(1, int(budget_mb // per_candidate_mb))


def repeat_batch(value, times: int, batch: int):
    """Call arguments for ``times`` stacked copies of a batch: batch-leading tensors repeated along dim 0
    (masks, rotary tables, position ids); anything else, such as a 1-D cache position, as it is."""
    if times == 1:
        return value
    if isinstance(value, torch.Tensor):
        return (
            value.repeat(times, *([1] * (value.ndim - 1)))
            if value.ndim >= 2 and value.shape[0] == batch
            else value
        )
    if isinstance(value, tuple | list):
        return type(value)(repeat_batch(v, times, batch) for v in value)
    if isinstance(value, dict):
        return {key: repeat_batch(v, times, batch) for key, v in value.items()}
    return value


def run_tails_layer_major(
    prunable: PrunableModel,
    layer_kwargs: list[dict],
    tails: Sequence[Tail],
    first_layers: Sequence[int],
    plans: Sequence[PruningPlan],
    batch: int,
    chunk: int,
    keep: KeepRule,
) -> tuple[list[TailResult], int]:
    """What tails.run_tails_one_by_one gives for each tail (``batch`` sequences each), computed with at
    most ``chunk`` candidates per layer call; and the number of layer forwards (the same)."""
    model, adapter = prunable.model, prunable.adapter
    layers, n_layers = adapter.layers(model), prunable.layout.num_layers
    layers_run = 0
    kept: dict[int, dict[int, torch.Tensor]] = {k: {} for k, *_ in tails}
    starting: dict[int, list] = {}
    for k, start, hidden, _ in tails:
        starting.setdefault(start, []).append((k, hidden))
    active: list[tuple[int, torch.Tensor]] = []  # (candidate, state entering the current layer)
    for index in range(min(starting, default=n_layers), n_layers):
        shared = []
        for k, hidden in active:
            if keep(index):
                kept[k][index] = hidden
            shared.append((k, hidden))
        passed = []
        for k, hidden in starting.get(index, []):
            if first_layers[k] == index:  # its own layer: alone, under its plan
                with prunable.trial(plans[k]):
                    passed.append((k, layer_output(layers[index](hidden, **layer_kwargs[index]))))
                layers_run += 1
            else:  # restarting past its own layer from saved states: the shared modules from here
                shared.append((k, hidden))
        for lo in range(0, len(shared), chunk):
            group = shared[lo : lo + chunk]
            kwargs = repeat_batch(layer_kwargs[index], len(group), batch)
            out = layer_output(layers[index](torch.cat([h for _, h in group]), **kwargs))
            passed.extend((k, h) for (k, _), h in zip(group, out.split(batch), strict=True))
            layers_run += len(group)
        active = passed
    finals = dict(active)
    return [(adapter.final_norm(model)(finals[k]), kept[k]) for k, *_ in tails], layers_run
