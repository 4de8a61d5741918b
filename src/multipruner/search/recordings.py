"""A batch's recording (the hidden states entering every decoder layer under the current plan, and the
layers' call arguments), and how the next step gets it without a forward.

Each step starts by recording its batches under the plan it starts from. The plan the next step starts
from is the last step's winner, whose tail already computed the states entering every layer past its
own, on every batch (the winner is always scored to the end), and cross-step reuse keeps them. So the
next step's recording is the old recording up to the first layer the winner changed, and the winner's
saved states after it. Where they are not all there (a reuse budget that keeps every k-th layer, another
process holding the winner under torchrun), the batch is recorded again. The numbers are those of a
fresh forward: nothing is approximated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.plan import PruningPlan
from ..core.surgery import PrunableModel
from .recorder import LayerInputRecorder, layer_output
from .reuse import SavedStates, first_difference


@dataclass
class Recording:
    """One batch under ``plan``: the states entering each layer, each layer's keyword arguments, and the
    final-normed states (computed when first asked for, where the recording was carried over)."""

    plan: PruningPlan
    inputs: list[torch.Tensor]
    kwargs: list[dict]
    final: torch.Tensor | None = None

    def current(self, prunable: PrunableModel) -> torch.Tensor:
        """The final-normed states of the model as recorded (its plan must be the one applied)."""
        if self.final is None:
            if prunable.plan != self.plan:
                raise RuntimeError("a recording's final states must be computed under its own plan")
            last = len(self.inputs) - 1
            layer = prunable.adapter.layers(prunable.model)[last]
            hidden = layer_output(layer(self.inputs[last], **self.kwargs[last]))
            self.final = prunable.adapter.final_norm(prunable.model)(hidden)
        return self.final


def record(prunable: PrunableModel, ids: torch.Tensor) -> Recording:
    """One forward of the model as it is now."""
    model, adapter = prunable.model, prunable.adapter
    with LayerInputRecorder(adapter.layers(model)) as recorder:
        final = adapter.decoder(model)(input_ids=ids, use_cache=False).last_hidden_state
    return Recording(prunable.plan, list(recorder.inputs), recorder.kwargs, final)


def carried_over(
    old: Recording | None, plan: PruningPlan, saved: SavedStates, batch: int
) -> Recording | None:
    """Batch ``batch``'s recording under ``plan`` from the last step's (``old``) and the states the last
    step's candidates left (``saved``), or None where they do not hold every layer's input."""
    if old is None:
        return None
    if old.plan == plan:
        return old
    changed = first_difference(old.plan, plan)
    layers = len(old.inputs)
    for candidate_plan, states in saved.values():
        kept = states.get(batch, {})
        if candidate_plan == plan and all(i in kept for i in range(changed + 1, layers)):
            inputs = old.inputs[: changed + 1] + [kept[i] for i in range(changed + 1, layers)]
            return Recording(plan, inputs, old.kwargs)
    return None
