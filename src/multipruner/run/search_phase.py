"""The search phase of ``multipruner prune``: calibration sets, channel order, scorers, the dense record,
then the configured method step by step, each step written durably so that a killed run resumes after
its last one; and the share of the search that the other processes of a torchrun launch score."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ..core.importance import ChannelOrder
from ..core.plan import PruningPlan
from ..faults import crash_point
from ..search.latency import LatencyTable, device_name, time_table
from ..search.loop import StepRecord, run_search
from ..search.method import run_method
from ..search.scoring import CalibrationScorer
from .context import RunContext
from .phases import Phase
from .run_dir import DenseRecord

if TYPE_CHECKING:
    from .pipeline import PruneJob

log = logging.getLogger(__name__)


class SearchPhase(Phase):
    name = "search"

    def done(self, ctx: RunContext) -> bool:
        """Finished, unless it stopped at --max-steps short of the target (a resume goes on)."""
        phase = ctx.run.manifest().phases.get(self.name)
        return phase is not None and not phase.get("stopped_at_max_steps")

    def memory_settings(self, job: PruneJob) -> list[str]:
        search = job.search
        lower = [f"--reuse-mb (now {search.reuse_mb:g})"]
        if search.layer_major_mb > 0:
            lower.append(f"--layer-major-mb (now {search.layer_major_mb:g})")
        return lower

    def memory_note(self, job: PruneJob) -> str:
        # the batch size is part of the run's settings (the resume check): a smaller one starts a new run
        return f"A smaller --batch-size (now {job.calibration.batch_size}) also helps, in a new run."

    def run(self, ctx: RunContext) -> dict:
        ctx.load()
        latency = latency_table(ctx)  # timed (or checked) before the calibration's minutes
        calibration = calibration_sets(ctx)
        random.seed(ctx.job.calibration.seed)
        torch.manual_seed(ctx.job.calibration.seed)
        ctx.order_channels(calibration)
        scorers = ctx.scorers(calibration)
        record_dense(ctx, scorers)
        plan = search(ctx, calibration, scorers, latency)
        return final_facts(ctx, plan, scorers)


def calibration_sets(ctx: RunContext) -> dict[str, torch.Tensor]:
    """The run's calibration tokens: as stored, else built (or taken from the start's checks) and stored
    before the search reads them, so a resumed run scores on exactly the same data."""
    calibration = ctx.run.load_calibration()
    if calibration is None:
        calibration = (
            ctx.calibration if ctx.calibration is not None else ctx.job.calibration.build(ctx.tokenizer)
        )
        crash_point("calibration_built")
        ctx.run.save_calibration(calibration)
    log.info(
        "calibration: block set %s, width set %s (sequences x tokens)",
        tuple(calibration["block"].shape),
        tuple(calibration["width"].shape),
    )
    return calibration


def record_dense(ctx: RunContext, scorers: dict[str, CalibrationScorer]) -> DenseRecord:
    """The dense model's calibration perplexity on each set: step -1 of the log, measured once."""
    dense = ctx.run.dense_record()
    if dense is None:
        started = time.perf_counter()
        dense = DenseRecord(
            ppl=scorers["block"].perplexity(),
            ppl_width=scorers["width"].perplexity(),
            params=ctx.layout.dense_params(),
        )
        ctx.run.append_record(replace(dense, elapsed_s=time.perf_counter() - started).to_dict())
    log.info("dense calibration perplexity: block set %.3f, width set %.3f", dense.ppl, dense.ppl_width)
    return dense


def search(
    ctx: RunContext,
    calibration: dict[str, torch.Tensor],
    scorers: dict[str, CalibrationScorer],
    latency: LatencyTable | None = None,
) -> PruningPlan:
    """Run the configured method from the run's last finished step; saves and returns the final plan."""
    run = ctx.run

    def on_step(record: StepRecord, plan: PruningPlan) -> None:
        run.append_record(record.to_dict())
        crash_point("step_logged")
        run.save_plan(plan, ctx.layout)
        crash_point("step_done")

    done = [StepRecord.from_dict(r) for r in run.step_records()]  # resumes after the last one
    order = ctx.prunable.channel_order
    ctx.release_workers(  # the other torchrun processes score their share of each step
        {
            "calibration": calibration,
            "done": [r.to_dict() for r in done],
            "channel_order": order.to_dict() if order else None,
            "latency": latency.to_dict() if latency else None,
        }
    )
    plan = run_method(
        ctx.prunable,
        scorers,
        ctx.search,
        done_steps=done,
        on_step=on_step,
        progress=ctx.job.progress,
        latency=latency,
    )
    meta = {**plan.meta, "source": ctx.source().to_dict()}
    if ctx.search.budget:  # what the plan was searched to reach, and on what workload (bench checks it)
        meta["budget"] = {"text": ctx.search.budget, "workload": ctx.search.latency_workload}
    plan = replace(plan, meta=meta)
    run.save_plan(plan, ctx.layout)
    ctx.plan = plan
    return plan


def latency_table(ctx: RunContext) -> LatencyTable | None:
    """A latency budget's table: the run's own on resume (refused if timed elsewhere), else timed now on
    this device and stored before the search uses it."""
    workload = ctx.search.latency_workload
    if workload is None:
        return None
    weights = next(ctx.model.parameters())
    table = ctx.run.latency_table()
    if table is None:
        started = time.perf_counter()
        table = time_table(
            ctx.prunable, workload, (ctx.search.mlp_group_size, ctx.search.attention_group_size)
        )
        ctx.run.save_latency_table(table)
        log.info(
            "latency table: %s of %d models on %s, %.1fs; dense %s",
            workload[0],
            table.timed_models,
            table.device,
            time.perf_counter() - started,
            f"{table.meta['medians_s']['dense'] * 1e3:.2f} ms",
        )
    table.check_matches(
        device_name(weights.device), ctx.layout, str(weights.dtype).removeprefix("torch."), workload
    )
    ctx.search.reachable_target(ctx.layout, weights.element_size(), table)  # before any step
    return table


def final_facts(ctx: RunContext, plan: PruningPlan, scorers: dict[str, CalibrationScorer]) -> dict:
    """What run.json records of the search: the final plan's calibration perplexities, the step count, and
    whether it stopped at --max-steps short of the target."""
    steps = len(ctx.run.step_records())
    stopped_early = ctx.search.max_steps is not None and steps >= ctx.search.max_steps
    ctx.prunable.apply(plan)
    facts = {"final_ppl": {k: s.perplexity() for k, s in scorers.items()}, "steps": steps}
    ctx.prunable.restore()
    cost = ctx.search.cost(ctx.layout, next(ctx.model.parameters()).element_size(), ctx.run.latency_table())
    if stopped_early and cost.reduction(plan) < ctx.search.target.reduction(cost):
        facts["stopped_at_max_steps"] = True
    return facts


def search_worker(ctx: RunContext) -> None:
    """A process other than rank 0 of a torchrun launch: score its share of the search, write nothing."""
    search = ctx.workers.broadcast()
    if search is None:
        return
    done = [StepRecord.from_dict(r) for r in search["done"]]
    if search["channel_order"] and ctx.prunable.channel_order is None:
        ctx.prunable.order_channels(ChannelOrder.from_dict(search["channel_order"]))
    latency = LatencyTable.from_dict(search["latency"]) if search.get("latency") else None
    run_search(
        ctx.prunable,
        ctx.scorers(search["calibration"]),
        ctx.search,
        done_steps=done,
        progress=False,
        latency=latency,
    )
