"""Evaluate one model, as ``multipruner eval`` (and the reference's evaluation-only ``prune --do_eval``)
does: a saved model, or a dense model with a plan applied."""

from __future__ import annotations

from ..core.checkpoint import saved_plan_data
from ..core.extract import extract
from ..core.surgery import PrunableModel
from ..evaluation.results import EvalResult
from ..evaluation.runner import EvalSettings, evaluate
from ..models import ModelSettings
from .planned_model import PlanRequest, load_dense_with_plan


def recorded_dense_params(spec: str) -> int | None:
    """The dense parameter count a saved pruned model's plan records (None: not a pruned model)."""
    plan = saved_plan_data(spec)
    return None if plan is None else plan.get("params", {}).get("dense")


def evaluate_model(
    model: ModelSettings,
    settings: EvalSettings,
    *,
    plan: PlanRequest | None = None,
    overrides: dict[str, str] | None = None,
) -> EvalResult:
    """Evaluate ``model`` (with ``plan`` applied, if given) on ``settings.tasks``."""
    if plan is not None:
        planned = load_dense_with_plan(model, plan)
        loaded = extract(PrunableModel.from_plan(planned.model, planned.plan), planned.plan)
        tokenizer, dense_params = planned.tokenizer, planned.layout.dense_params()
    else:
        loaded, tokenizer = model.load()
        dense_params = recorded_dense_params(model.model)
    return evaluate(
        loaded, tokenizer, settings, name=model.model, dense_params=dense_params, overrides=overrides or None
    )
