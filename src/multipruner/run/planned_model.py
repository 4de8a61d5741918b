"""A dense model with a plan read against it, as ``extract``, ``compensate`` and ``eval --plan`` use it.

The plan file and the flags that go with it are checked first (:meth:`PlanRequest.check`), so that a bad
plan is refused before the model, which takes far longer, loads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..core.importance import CHANNEL_IMPORTANCE
from ..core.layout import ModelLayout, layout_of
from ..core.plan import PruningPlan, check_plan_file, load_plan
from ..errors import UsageError
from ..model_sources import describe_source
from ..models import ModelSettings
from ..search.calibration import CalibrationSettings


class PlanRequestError(UsageError):
    """A plan, or a flag given with it, that cannot be applied as asked."""


@dataclass(frozen=True)
class PlanRequest:
    """A plan file and how to apply it.

    ``weight_reorder``: None keeps what the plan records. ``activation_order``: recompute the channel
    order by activations on these calibration sets, for a plan searched that way that does not store
    its order (the reference format, ``docs/quality.json``).
    """

    path: str
    weight_reorder: bool | None = None
    activation_order: CalibrationSettings | None = None

    def check(self, *, texts: bool = False) -> dict:
        """Everything that needs no model: the plan file, and the activation order's flags against it;
        with ``texts``, also the calibration text it will read (before a model loads: reading it takes
        longer than the rest). Returns the plan file's data."""
        data = check_plan_file(self.path)
        calibration = self.activation_order
        if calibration is not None:
            if data.get("channel_order"):
                raise PlanRequestError(f"{self.path} stores its channel order; leave out --activation-order")
            reorder = (
                self.weight_reorder if self.weight_reorder is not None else data.get("weight_reorder", True)
            )
            if not reorder:
                raise PlanRequestError(
                    "--activation-order reorders channels; it cannot go with --no-weight-reorder"
                )
            calibration.validate()
            if texts:
                calibration.check_source()
        return data


@dataclass
class PlannedModel:
    """The dense model as loaded, and the plan read against its layout (not applied yet)."""

    model: Any
    tokenizer: Any
    layout: ModelLayout
    plan: PruningPlan


def load_dense_with_plan(model: ModelSettings, request: PlanRequest) -> PlannedModel:
    """Check the request, load the dense model and read the plan against it (with the recomputed
    channel order when the request asks for one)."""
    request.check()
    dense, tokenizer = model.load()
    layout = layout_of(dense)
    plan = load_plan(request.path, layout, weight_reorder=request.weight_reorder)
    plan = replace(plan, meta={**plan.meta, "source": describe_source(model.model)})
    calibration = request.activation_order
    if calibration is not None:
        order = CHANNEL_IMPORTANCE["activations"].order(
            dense, calibration.build(tokenizer), calibration.batch_size
        )
        plan = replace(plan, channel_order=order)
    return PlannedModel(dense, tokenizer, layout, plan)
