"""The phases after the search: compensate, extract, recover, evaluate, report.

Each writes its output into the run directory and is recorded in run.json with what it was made from;
a phase is done when that record matches the current plan and settings and its outputs are there.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.checkpoint import save_pruned
from ..core.extract import extract
from ..core.plan import PruningPlan
from ..repair.compensate import compensate, compensation_summary
from ..repair.recover import recover
from ..settings import to_dict
from .context import RunContext

if TYPE_CHECKING:
    from .pipeline import PruneJob


def plan_fingerprint(plan: PruningPlan) -> str:
    """Identifies a plan's structure, so a phase done for another plan (a search resumed since) reruns."""
    data = {k: v for k, v in plan.to_dict().items() if k != "meta"}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class Phase:
    name = ""

    def wanted(self, job: PruneJob) -> bool:
        return True

    def inputs(self, ctx: RunContext) -> dict:
        """What the phase's result depends on besides the plan (its settings, the model it starts from),
        as run.json records it: a change makes the phase run again."""
        return {}

    def outputs(self, ctx: RunContext) -> list[Path]:
        """The files or directories the phase leaves; one that is missing makes it run again."""
        return []

    def record(self, ctx: RunContext) -> dict:
        """The facts run.json keeps for ``done``: the inputs and the plan's fingerprint."""
        return {**self.inputs(ctx), "plan": plan_fingerprint(ctx.current_plan())}

    def done(self, ctx: RunContext) -> bool:
        """Recorded in run.json for the current plan and inputs, with every output present."""
        facts = ctx.run.manifest().phases.get(self.name)
        if facts is None or any(facts.get(k) != v for k, v in self.record(ctx).items()):
            return False
        return all(path.exists() for path in self.outputs(ctx))

    def run(self, ctx: RunContext) -> dict:
        raise NotImplementedError

    def memory_settings(self, job: PruneJob) -> list[str]:
        """The settings that bound this phase's memory, with their values (named when it runs out)."""
        return [f"--device cpu (now {job.model.device})"]

    def memory_note(self, job: PruneJob) -> str:
        """What else would help, when it cannot be changed on a resume."""
        return ""


class CompensatePhase(Phase):
    """Closed-form refit of the narrowed branches (``repair.compensate``), saved as model-compensated/."""

    name = "compensate"

    def wanted(self, job: PruneJob) -> bool:
        return job.run.compensate

    def inputs(self, ctx: RunContext) -> dict:
        return {"settings": to_dict(ctx.job.compensation)}

    def outputs(self, ctx: RunContext) -> list[Path]:
        return [ctx.run.stage_dir("compensated")]

    def run(self, ctx: RunContext) -> dict:
        ctx.load()
        plan = ctx.current_plan()
        calibration = ctx.run.load_calibration()
        tokens = ctx.job.compensation.calibration_tokens(ctx.job.calibration, calibration, ctx.tokenizer)
        pruned = extract(ctx.prunable, plan)
        fits = compensate(
            ctx.prunable,
            pruned,
            plan,
            tokens,
            ctx.job.compensation,
            batch_size=ctx.job.calibration.batch_size,
            progress=ctx.job.progress,
        )
        summary = compensation_summary(fits, ctx.job.compensation, tokens)
        saved = replace(plan, meta={**plan.meta, "compensation": summary})
        save_pruned(
            pruned, ctx.tokenizer, ctx.run.stage_dir("compensated"), saved, ctx.layout, overwrite=True
        )
        return {**self.record(ctx), **summary}


class ExtractPhase(Phase):
    name = "extract"

    def wanted(self, job: PruneJob) -> bool:
        return job.run.extract or job.run.recover

    def outputs(self, ctx: RunContext) -> list[Path]:
        return [ctx.run.stage_dir("pruned")]

    def run(self, ctx: RunContext) -> dict:
        ctx.load()
        pruned = extract(ctx.prunable, ctx.current_plan())
        save_pruned(pruned, ctx.tokenizer, ctx.run.stage_dir("pruned"), ctx.plan, ctx.layout, overwrite=True)
        return {"path": str(ctx.run.stage_dir("pruned")), **self.record(ctx)}


class RecoverPhase(Phase):
    """LoRA recovery (``repair.recover``) of the last model made so far, saved as model-recovered/."""

    name = "recover"

    def memory_settings(self, job: PruneJob) -> list[str]:
        return [f"--recover-batch-size (now {job.recovery.batch_size})", *super().memory_settings(job)]

    def wanted(self, job: PruneJob) -> bool:
        return job.run.recover

    def source(self, ctx: RunContext) -> str:
        return "compensated" if ctx.job.run.compensate else "pruned"

    def inputs(self, ctx: RunContext) -> dict:
        return {"settings": to_dict(ctx.job.recovery), "from": self.source(ctx)}

    def outputs(self, ctx: RunContext) -> list[Path]:
        return [ctx.run.stage_dir("recovered")]

    def run(self, ctx: RunContext) -> dict:
        model = ctx.job.model
        summary = recover(
            ctx.run.stage_dir(self.source(ctx)),
            ctx.run.stage_dir("recovered"),
            ctx.job.recovery,
            resume=True,
            overwrite=True,
            dtype=model.torch_dtype(),
            device=model.torch_device(),
            progress=ctx.job.progress,
        )
        return {**self.record(ctx), "first_loss": summary["first_loss"], "last_loss": summary["last_loss"]}


class EvaluatePhase(Phase):
    """The dense model and every model the run saved (pruned, compensated, recovered), each on the
    evaluation settings' texts and tasks: eval_<model>.json."""

    name = "evaluate"

    def memory_settings(self, job: PruneJob) -> list[str]:
        return [f"--eval-batch-size (now {job.evaluation.batch_size})", *super().memory_settings(job)]

    def wanted(self, job: PruneJob) -> bool:
        return job.run.do_eval

    def inputs(self, ctx: RunContext) -> dict:
        return {"settings": to_dict(ctx.job.evaluation)}

    def outputs(self, ctx: RunContext) -> list[Path]:
        return [ctx.run.eval_file(which) for which in ("dense", *ctx.stages())]

    def run(self, ctx: RunContext) -> dict:
        from ..evaluation.runner import evaluate

        ctx.load()
        ctx.current_plan()
        ctx.prunable.restore()
        dense_params = ctx.layout.dense_params()
        for which in ("dense", *ctx.stages()):
            model = ctx.model if which == "dense" else ctx.stage_model(which)
            result = evaluate(
                model,
                ctx.tokenizer,
                ctx.job.evaluation,
                name=f"{ctx.job.model.model} ({which})",
                dense_params=dense_params,
                progress=ctx.job.progress,
            )
            result.write(ctx.run.eval_file(which))
            ctx.prunable.restore()
        return self.record(ctx)


class ReportPhase(Phase):
    name = "report"

    def wanted(self, job: PruneJob) -> bool:
        return job.run.report

    def done(self, ctx: RunContext) -> bool:
        return False  # cheap, and it should show what the other phases just wrote

    def run(self, ctx: RunContext) -> dict:
        from ..report import write_report

        return {"path": str(write_report(ctx.run.path))}
