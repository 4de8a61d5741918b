"""``multipruner prune`` as a sequence of phases over one run directory:

    search -> (compensate) -> extract -> (recover) -> evaluate -> report

Each phase has its settings, writes its output into the run directory and is marked done in run.json;
with ``--resume`` a done phase is skipped and an unfinished search continues from its last step. All
settings are checked before anything heavy runs or anything is written. The phases live in
``search_phase`` and ``phases``, what they share in ``context``, the run's files in ``run_dir``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..evaluation.runner import EvalSettings
from ..io_utils import check_output
from ..models import ModelSettings
from ..out_of_memory import is_out_of_memory, out_of_memory_stop
from ..repair.compensate import CompensateSettings
from ..repair.recover import RecoverSettings
from ..search.calibration import CalibrationSettings
from ..search.distributed import bind_device, join, world_size
from ..search.method import scores_in_one_shot
from ..search.settings import SearchConfigError, SearchSettings
from ..settings import setting
from .context import RunContext
from .phases import CompensatePhase, EvaluatePhase, ExtractPhase, Phase, RecoverPhase, ReportPhase
from .run_dir import RunDirectory
from .search_phase import SearchPhase, search_worker

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
        help="evaluate the dense model and every model the run saves (pruned, compensated, recovered) at "
        "the end, on --eval-tasks (e.g. --eval-tasks wikitext2 --eval-max-windows 8: a quick check)",
        aliases=("--do_eval",),
        affects_result=False,
    )
    report: bool = setting(True, help="write report.md and its figures at the end", affects_result=False)


# settings groups stored in run.json; those that change the plan are checked on --resume
RESULT_GROUPS = ("model", "calibration", "search")


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

    def result_settings(self) -> dict:
        """The settings groups that decide the plan, as run.json stores them."""
        return {name: getattr(self, name) for name in RESULT_GROUPS}

    def output_dir(self) -> Path:
        return Path(self.run.output_path or Path("runs") / Path(self.model.model).name.removesuffix(".gguf"))

    def validate(self) -> None:
        """Everything that can be checked without the model or data."""
        check_output(self.output_dir(), directory=True)  # an existing run is resumed or refused later
        self.calibration.validate()
        block, width = self.calibration.set_sizes()
        if block.tokens is not None:  # with the reference's sample counts the sizes are known once drawn
            if problem := self.search.screen_problem({"block": block.tokens, "width": width.tokens}):
                raise SearchConfigError(problem)
        self.model.torch_device()  # an unknown device or a missing GPU fails now
        if self.run.do_eval:
            self.evaluation.validate()
        if self.run.compensate:
            self.compensation.validate()
        if self.run.recover:
            self.recovery.validate()


PHASES: tuple[Phase, ...] = (
    SearchPhase(),
    CompensatePhase(),
    ExtractPhase(),
    RecoverPhase(),
    EvaluatePhase(),
    ReportPhase(),
)


def prune(job: PruneJob) -> RunDirectory | None:
    """Run every wanted phase that is not done; returns the run directory (None on a torchrun process
    other than rank 0, which only shares the search)."""
    job.validate()
    run = RunDirectory(job.output_dir())
    ctx = RunContext(job, run)
    if world_size() > 1:
        if scores_in_one_shot(job.search):
            raise UsageError("--method shortgpt scores in one shot; run it without torchrun")
        if job.model.offload != "none":
            # every process would write the reordered shards into the one run directory
            raise UsageError("--offload disk runs in one process for now; run it without torchrun")
        bind_device(job.model.torch_device())
        ctx.load()  # every process; checks the process count against the layers before any waits
        ctx.workers = join(job.model.torch_device())
        if not ctx.workers.is_main:
            search_worker(ctx)
            return None
    run.check_start(job.run.resume)  # before the model loads; checked again once the directory is ours
    if not run.exists():  # model-dependent checks and calibration data fail before anything is written
        ctx.load()
        ctx.calibration = job.calibration.build(ctx.tokenizer)
    run.lock()
    run.start_or_resume(job.run.resume, ctx.source(), job.result_settings())
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
        try:
            facts = phase.run(ctx)
        except Exception as err:  # noqa: BLE001 - only an allocation failure is turned into a stop
            if not is_out_of_memory(err):
                raise
            steps = len(run.step_records())
            raise out_of_memory_stop(
                err,
                phase.name,
                phase.memory_settings(job),
                f"the {steps} finished search steps and the phases done are kept in {run.path}",
                phase.memory_note(job),
            ) from None
        run.mark_done(phase.name, wall_s=round(time.perf_counter() - started, 3), **facts)
        if facts.get("stopped_at_max_steps"):
            log.info(
                "the search stopped at --max-steps; the phases after it use the plan so far (resume to go on)"
            )
    ctx.release_workers()
    return run


__all__ = ["PHASES", "PruneJob", "RunOptions", "UsageError", "prune"]
