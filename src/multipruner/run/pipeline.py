"""``multipruner prune`` as a sequence of phases over one run directory:

    search -> (compensate) -> extract -> (recover) -> evaluate -> report

Each phase has its settings, writes its output into the run directory and is marked done in run.json;
with ``--resume`` a done phase is skipped and an unfinished search continues from its last step. All
settings are checked before anything heavy runs or anything is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..search.calibration import CalibrationSettings
from ..repair.compensate import CompensateSettings, compensate, compensation_summary
from ..search.distributed import Workers, bind_device, check_world_size, join, world_size
from ..errors import UsageError
from ..evaluation.runner import EvalSettings
from ..core.checkpoint import load_pruned, save_pruned
from ..core.extract import extract
from ..core.surgery import PrunableModel
from ..faults import crash_point
from ..core.layout import ModelLayout, layout_of
from ..models import ModelSettings, describe_source
from ..core.plan import PruningPlan
from ..repair.recover import RecoverSettings, recover
from ..core.reorder import ChannelOrder, calibration_channel_order
from .run_dir import MODEL_STAGES, DenseRecord, ModelSource, RunDirectory, RunDirError, RunManifest
from ..search.scoring import CalibrationScorer, LossSettings, ignored_label
from ..search.loop import SearchConfigError, SearchSettings, StepRecord, run_search
from ..settings import differences, setting, to_dict, unrecorded_values
from ..search.shortgpt import run_shortgpt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """Where the run goes and which optional phases run; none of it changes the plan."""

    output_path: str | None = setting(
        None,
        help="run directory (default runs/<model>)",
        aliases=("--output_path", "--output"),
        affects_result=False,
    )
    resume: bool = setting(
        False,
        help="continue the run in the output directory: finished phases are skipped",
        affects_result=False,
    )
    extract: bool = setting(False, help="save the pruned model to <run>/model", affects_result=False)
    compensate: bool = setting(
        False,
        help="also save a compensated model: narrowed branches' output projections refit in closed form",
        affects_result=False,
    )
    recover: bool = setting(
        False,
        help="also save a LoRA-recovered model (from the compensated one with --compensate)",
        affects_result=False,
    )
    do_eval: bool = setting(
        False,
        help="evaluate the dense and the pruned model at the end",
        aliases=("--do_eval",),
        affects_result=False,
    )
    report: bool = setting(True, help="write report.md and its figures at the end", affects_result=False)


# settings groups stored in run.json; those that change the plan are checked on --resume
RESULT_GROUPS = {"model": ModelSettings, "calibration": CalibrationSettings, "search": SearchSettings}


@dataclass(frozen=True)
class PruneJob:
    model: ModelSettings = field(default_factory=ModelSettings)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    search: SearchSettings = field(default_factory=SearchSettings)
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    compensation: CompensateSettings = field(default_factory=CompensateSettings)
    recovery: RecoverSettings = field(default_factory=RecoverSettings)
    run: RunOptions = field(default_factory=RunOptions)
    progress: bool = True

    def output_dir(self) -> Path:
        return Path(self.run.output_path or Path("runs") / Path(self.model.model).name.removesuffix(".gguf"))

    def validate(self) -> None:
        """Everything that can be checked without the model or data."""
        output = self.output_dir()
        if output.exists() and not output.is_dir():
            raise UsageError(
                f"the output {output} is a file; a run needs a directory: choose another --output"
            )
        existing = next(p for p in (output, *output.absolute().parents) if p.exists())
        if not os.access(existing, os.W_OK):
            raise UsageError(
                f"the output {output} is not writable ({existing} is read-only): choose another --output"
            )
        self.calibration.validate()
        self.search.validate_ratio()
        self.model.torch_device()  # an unknown device or a missing GPU fails now
        if self.run.do_eval:
            self.evaluation.validate()
        if self.run.compensate:
            self.compensation.validate()
        if self.run.recover:
            self.recovery.validate()


class RunContext:
    """What the phases share: the job, the run directory, and the dense model once loaded."""

    def __init__(self, job: PruneJob, run: RunDirectory):
        self.job, self.run = job, run
        self.workers: Workers | None = None  # the other processes of a torchrun launch
        self._workers_released = False
        self.model = self.tokenizer = self.prunable = None
        self.layout: ModelLayout | None = None
        self.search: SearchSettings | None = None
        self.plan: PruningPlan | None = None
        self.calibration: dict[str, torch.Tensor] | None = None

    def load(self) -> None:
        """Load the dense model, check the model-dependent settings and reorder it (once)."""
        if self.model is not None:
            return
        self.model, self.tokenizer = self.job.model.load()
        if getattr(self.model.config, "pruned_structure", None) is not None:
            raise UsageError(
                f"{self.job.model.model} is a model multipruner already pruned; searching it again would "
                "stack plans that no file records. Prune its dense source with a higher --target-ratio "
                "instead (its multipruner_plan.json names the source)"
            )
        self.layout = layout_of(self.model)
        check_world_size(self.layout.num_layers)
        self.search = self.job.search.resolved(self.layout)
        check_seqlen(self.model, self.job.calibration.seqlen)
        stored = self.run.plan()
        order = stored[0].channel_order if stored else None
        # an order by activations needs the calibration sets: the search phase makes it (order_channels)
        deferred = self.search.orders_by_activations and order is None
        self.prunable = PrunableModel.prepare(self.model, self.search.weight_reorder and not deferred, order)

    def order_channels(self, calibration: dict[str, torch.Tensor]) -> None:
        """Order the channels by their activations on both calibration sets, unless already ordered."""
        if self.search.orders_by_activations and self.prunable.channel_order is None:
            started = time.perf_counter()
            order = calibration_channel_order(
                self.model, calibration, self.job.calibration.batch_size, self.prunable.adapter
            )
            self.prunable.order_channels(order)
            log.info(
                "channels ordered by activations on %d tokens (%.1fs)",
                sum(t.numel() for t in calibration.values()),
                time.perf_counter() - started,
            )

    def source(self) -> ModelSource:
        return ModelSource(**describe_source(self.job.model.model))

    def scorers(self, calibration: dict[str, torch.Tensor]) -> dict[str, CalibrationScorer]:
        """One scorer per calibration set, as every process of the search builds them."""
        job = self.job
        loss = LossSettings(
            ignore_index=ignored_label(self.tokenizer),
            batch_size=job.calibration.batch_size,
            layer_major_budget_mb=self.search.layer_major_mb,
        )
        device = job.model.torch_device()
        return {
            k: CalibrationScorer(self.prunable, v, loss, device, self.workers) for k, v in calibration.items()
        }

    def release_workers(self, search: dict | None = None) -> None:
        """Rank 0: send the other processes the search to share (its calibration tokens and the steps
        already done), or None when there is none to run. Called once; a no-op without torchrun."""
        if self.workers is not None and not self._workers_released:
            self.workers.broadcast(search)
            self._workers_released = True

    def stages(self) -> list[str]:
        """The models this job makes, in order (the plain pruned one always)."""
        wanted = {"compensated": self.job.run.compensate, "recovered": self.job.run.recover}
        return [stage for stage in MODEL_STAGES if stage == "pruned" or wanted[stage]]

    def stage_model(self, stage: str):
        """A stage's model as the run saved it; the plain pruned one is extracted when not saved."""
        path = self.run.stage_dir(stage)
        if path.is_dir():
            return load_pruned(
                path, dtype=self.job.model.torch_dtype(), device=self.job.model.torch_device()
            )[0]
        if stage != "pruned":
            raise RunDirError(f"{path} is missing: run the {stage} phase first")
        return extract(self.prunable, self.current_plan())

    def current_plan(self) -> PruningPlan:
        if self.plan is None:
            stored = self.run.plan()
            if stored is None:
                raise RunDirError(f"{self.run.path} has no plan.json: the search has not finished")
            self.plan = stored[0]
        return self.plan


def check_seqlen(model, seqlen: int) -> None:
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if limit and seqlen > limit:
        raise SearchConfigError(f"--seqlen {seqlen} is longer than the model's context ({limit} tokens)")


# --- phases --------------------------------------------------------------------------------------
def plan_fingerprint(plan: PruningPlan) -> str:
    """Identifies a plan's structure, so a phase done for another plan (a search resumed since) reruns."""
    data = {k: v for k, v in plan.to_dict().items() if k != "meta"}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class Phase:
    name = ""

    def wanted(self, job: PruneJob) -> bool:
        return True

    def done(self, ctx: RunContext) -> bool:
        """Recorded in run.json for the current plan."""
        facts = ctx.run.manifest().phases.get(self.name)
        return facts is not None and facts.get("plan") == plan_fingerprint(ctx.current_plan())

    def run(self, ctx: RunContext) -> dict:
        raise NotImplementedError


class SearchPhase(Phase):
    name = "search"

    def run(self, ctx: RunContext) -> dict:
        ctx.load()
        job, run = ctx.job, ctx.run
        calibration = run.load_calibration()
        if calibration is None:
            calibration = (
                ctx.calibration if ctx.calibration is not None else job.calibration.build(ctx.tokenizer)
            )
            crash_point("calibration_built")
            run.save_calibration(calibration)
        log.info(
            "calibration: block set %s, width set %s (sequences x tokens)",
            tuple(calibration["block"].shape),
            tuple(calibration["width"].shape),
        )
        random.seed(job.calibration.seed)
        torch.manual_seed(job.calibration.seed)
        ctx.order_channels(calibration)
        scorers = ctx.scorers(calibration)
        dense = run.dense_record()
        if dense is None:
            started = time.perf_counter()
            dense = DenseRecord(
                ppl=scorers["block"].perplexity(),
                ppl_width=scorers["width"].perplexity(),
                params=ctx.layout.dense_params(),
            )
            run.append_record(replace(dense, elapsed_s=time.perf_counter() - started).to_dict())
        log.info("dense calibration perplexity: block set %.3f, width set %.3f", dense.ppl, dense.ppl_width)

        def on_step(record: StepRecord, plan: PruningPlan) -> None:
            run.append_record(record.to_dict())
            crash_point("step_logged")
            run.save_plan(plan, ctx.layout)
            crash_point("step_done")

        done = [StepRecord.from_dict(r) for r in run.step_records()]  # resumes after the last one
        if ctx.search.method == "shortgpt":
            plan = run_shortgpt(
                ctx.prunable,
                scorers["block"].perplexity,
                calibration["block"],
                ctx.search,
                batch_size=job.calibration.batch_size,
                done_steps=len(done),
                on_step=on_step,
            )
        else:
            order = ctx.prunable.channel_order
            ctx.release_workers(
                {
                    "calibration": calibration,
                    "done": [r.to_dict() for r in done],
                    "channel_order": order.to_dict() if order else None,
                }
            )
            plan = run_search(
                ctx.prunable, scorers, ctx.search, done_steps=done, on_step=on_step, progress=job.progress
            )
        plan = replace(plan, meta={**plan.meta, "source": ctx.source().to_dict()})
        run.save_plan(plan, ctx.layout)
        ctx.plan = plan
        stopped_early = ctx.search.max_steps is not None and len(run.step_records()) >= ctx.search.max_steps
        ctx.prunable.apply(plan)
        facts = {
            "final_ppl": {k: s.perplexity() for k, s in scorers.items()},
            "steps": len(run.step_records()),
        }
        ctx.prunable.restore()
        if stopped_early and plan.ratio(ctx.layout, ctx.search.ratio_accounting) < ctx.search.target_ratio:
            facts["stopped_at_max_steps"] = True
        return facts

    def done(self, ctx: RunContext) -> bool:
        phase = ctx.run.manifest().phases.get(self.name)
        return phase is not None and not phase.get("stopped_at_max_steps")


class CompensatePhase(Phase):
    """Closed-form refit of the narrowed branches (``compensate.py``), saved as model-compensated/."""

    name = "compensate"

    def wanted(self, job: PruneJob) -> bool:
        return job.run.compensate

    def done(self, ctx: RunContext) -> bool:
        facts = ctx.run.manifest().phases.get(self.name, {})
        same = facts.get("settings") == to_dict(ctx.job.compensation)
        return super().done(ctx) and same and ctx.run.stage_dir("compensated").is_dir()

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
        return {"settings": to_dict(ctx.job.compensation), "plan": plan_fingerprint(plan), **summary}


class ExtractPhase(Phase):
    name = "extract"

    def wanted(self, job: PruneJob) -> bool:
        return job.run.extract or job.run.recover

    def done(self, ctx: RunContext) -> bool:
        return super().done(ctx) and ctx.run.stage_dir("pruned").is_dir()

    def run(self, ctx: RunContext) -> dict:
        ctx.load()
        pruned = extract(ctx.prunable, ctx.current_plan())
        save_pruned(pruned, ctx.tokenizer, ctx.run.stage_dir("pruned"), ctx.plan, ctx.layout, overwrite=True)
        return {"path": str(ctx.run.stage_dir("pruned")), "plan": plan_fingerprint(ctx.plan)}


class RecoverPhase(Phase):
    """LoRA recovery (``recover.py``) of the last model made so far, saved as model-recovered/."""

    name = "recover"

    def wanted(self, job: PruneJob) -> bool:
        return job.run.recover

    def done(self, ctx: RunContext) -> bool:
        facts = ctx.run.manifest().phases.get(self.name, {})
        same = facts.get("settings") == to_dict(ctx.job.recovery) and facts.get("from") == self.source(ctx)
        return super().done(ctx) and same and ctx.run.stage_dir("recovered").is_dir()

    def source(self, ctx: RunContext) -> str:
        return "compensated" if ctx.job.run.compensate else "pruned"

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
        return {
            "settings": to_dict(ctx.job.recovery),
            "from": self.source(ctx),
            "plan": plan_fingerprint(ctx.current_plan()),
            "first_loss": summary["first_loss"],
            "last_loss": summary["last_loss"],
        }


class EvaluatePhase(Phase):
    name = "evaluate"

    def wanted(self, job: PruneJob) -> bool:
        return job.run.do_eval

    def done(self, ctx: RunContext) -> bool:
        phase = ctx.run.manifest().phases.get(self.name, {})
        same = super().done(ctx) and phase.get("settings") == to_dict(ctx.job.evaluation)
        return same and all(ctx.run.eval_file(w).is_file() for w in ("dense", *ctx.stages()))

    def run(self, ctx: RunContext) -> dict:
        from ..evaluation.runner import evaluate

        ctx.load()
        plan = ctx.current_plan()
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
        return {"settings": to_dict(ctx.job.evaluation), "plan": plan_fingerprint(plan)}


class ReportPhase(Phase):
    name = "report"

    def wanted(self, job: PruneJob) -> bool:
        return job.run.report

    def done(self, ctx: RunContext) -> bool:
        return False  # cheap, and it should show what the other phases just wrote

    def run(self, ctx: RunContext) -> dict:
        from ..report import write_report

        return {"path": str(write_report(ctx.run.path))}


PHASES: tuple[Phase, ...] = (
    SearchPhase(),
    CompensatePhase(),
    ExtractPhase(),
    RecoverPhase(),
    EvaluatePhase(),
    ReportPhase(),
)


# --- the job ----------------------------------------------------------------------------------------
def start_or_resume(job: PruneJob, run: RunDirectory) -> None:
    """Write run.json for a new run, or check a resumed run's settings against the stored ones."""
    if not run.exists():
        if job.run.resume and run.holds_other_files():
            raise RunDirError(
                f"--resume: {run.path} is not a multipruner run (no run.json); choose the run's directory"
            )
        run.reset_steps()  # steps without a manifest: a run killed before it started
        settings = {name: to_dict(getattr(job, name)) for name in RESULT_GROUPS}
        run.write_manifest(RunManifest(ModelSource(**describe_source(job.model.model)), settings))
        return
    if not job.run.resume:
        raise RunDirError(
            f"{run.path} already holds a run; pass --resume to continue it, or choose another output"
        )
    manifest = run.manifest()
    # a setting the stored run does not record (it predates it) had its default's behaviour
    changed = [
        d
        for name, cls in RESULT_GROUPS.items()
        for d in differences(
            cls,
            {**to_dict(cls()), **unrecorded_values(cls), **manifest.settings.get(name, {})},
            getattr(job, name),
        )
    ]
    if changed:
        hint = (
            " (a run made before multipruner-run/2 used the reference's sample counts: resume it with "
            "--num_calibration_samples_block/--num_calibration_samples_width as it was started, or start anew)"
            if manifest.format == "legacy"
            else ""
        )
        raise RunDirError(f"cannot resume {run.path}: settings differ ({'; '.join(changed)}){hint}")
    if manifest.format == "legacy":  # migrate: same settings, now in the current format
        manifest = RunManifest(manifest.source, {n: to_dict(getattr(job, n)) for n in RESULT_GROUPS}, {})
        run.write_manifest(manifest)
        log.info("migrated %s to %s", run.manifest_file, manifest.format)


def search_worker(ctx: RunContext) -> None:
    """A process other than rank 0 of a torchrun launch: score its share of the search, write nothing."""
    search = ctx.workers.broadcast()
    if search is None:
        return
    done = [StepRecord.from_dict(r) for r in search["done"]]
    if search["channel_order"] and ctx.prunable.channel_order is None:
        ctx.prunable.order_channels(ChannelOrder.from_dict(search["channel_order"]))
    run_search(ctx.prunable, ctx.scorers(search["calibration"]), ctx.search, done_steps=done, progress=False)


def prune(job: PruneJob) -> RunDirectory | None:
    """Run every wanted phase that is not done; returns the run directory (None on a torchrun process
    other than rank 0, which only shares the search)."""
    job.validate()
    run = RunDirectory(job.output_dir())
    ctx = RunContext(job, run)
    if world_size() > 1:
        if job.search.method == "shortgpt":
            raise UsageError("--method shortgpt scores in one shot; run it without torchrun")
        bind_device(job.model.torch_device())
        ctx.load()  # every process; checks the process count against the layers before any waits
        ctx.workers = join(job.model.torch_device())
        if not ctx.workers.is_main:
            search_worker(ctx)
            return None
    if run.exists() and not job.run.resume:
        raise RunDirError(
            f"{run.path} already holds a run; pass --resume to continue it, or choose another output"
        )
    if not run.exists():  # model-dependent checks and calibration data fail before anything is written
        ctx.load()
        ctx.calibration = job.calibration.build(ctx.tokenizer)
    run.lock()
    start_or_resume(job, run)
    for phase in PHASES:
        if not phase.wanted(job):
            continue
        if phase.done(ctx):
            log.info("phase %s: done already", phase.name)
            continue
        if phase.name != "search":
            ctx.release_workers()  # the search, if any, is over
        log.info("phase %s", phase.name)
        started = time.perf_counter()
        facts = phase.run(ctx)
        run.mark_done(phase.name, wall_s=round(time.perf_counter() - started, 3), **facts)
        if facts.get("stopped_at_max_steps"):
            log.info(
                "the search stopped at --max-steps; the phases after it use the plan so far (resume to go on)"
            )
    ctx.release_workers()
    return run


__all__ = ["PHASES", "PruneJob", "RunOptions", "UsageError", "prune"]
