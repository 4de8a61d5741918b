"""``prune``: search what to remove, then (as asked) extract, compensate, recover and evaluate, in one run."""

from __future__ import annotations

from dataclasses import replace

from ..cli_options import add_settings, settings_from_args
from .measure import evaluate


def add_prune(sub) -> None:
    from ..evaluation.runner import EvalSettings
    from ..models import ModelSettings
    from ..repair.compensate import CompensateSettings
    from ..repair.recover import RecoverSettings
    from ..run.pipeline import RunOptions
    from ..search.calibration import CalibrationSettings
    from ..search.settings import SearchSettings

    p = sub.add_parser("prune", help="search what to remove (blocks, MLP channels, heads); extract, evaluate")
    add_settings(p, ModelSettings, title="model")
    add_settings(p, RunOptions, title="run")
    add_settings(p, SearchSettings, title="search")
    add_settings(p, CalibrationSettings, title="calibration")
    add_settings(p, EvalSettings, prefix="eval-", title="evaluation (with --do-eval)")
    add_settings(p, CompensateSettings, prefix="compensate-", title="compensation (with --compensate)")
    add_settings(p, RecoverSettings, prefix="recover-", title="LoRA recovery (with --recover)")
    ref = p.add_argument_group("the reference's flags with nothing to set here")
    ref.add_argument("--do_prune", "--do-prune", action="store_true", help="run the search (always done)")
    ref.add_argument(
        "--importance_metric",
        "--importance-metric",
        choices=["ppl"],
        default=None,
        help="ppl: score every candidate by calibration perplexity, as the reference does (= --objective nll "
        "--screen-tokens 0 --width-screen forward)",
    )
    ref.add_argument(
        "--pruned_model_config_file",
        default=None,
        help="with --do_eval and no --do_prune: evaluate this plan",
    )
    p.set_defaults(func=cmd_prune)


def cmd_prune(args) -> None:
    from ..evaluation.runner import EvalSettings
    from ..models import ModelSettings
    from ..repair.compensate import CompensateSettings
    from ..repair.recover import RecoverSettings
    from ..report.summary import prune_summary
    from ..run.pipeline import PruneJob, RunOptions, prune
    from ..run.planned_model import PlanRequest
    from ..search.calibration import CalibrationSettings
    from ..search.settings import SearchSettings

    if args.do_eval and not args.do_prune and args.pruned_model_config_file:
        # the reference's evaluation-only mode: the dense model with its (L1-reordered) plan applied
        plan = PlanRequest(args.pruned_model_config_file, weight_reorder=True)
        model = settings_from_args(ModelSettings, args)
        evaluate(model, settings_from_args(EvalSettings, args, prefix="eval-"), plan=plan)
        return
    search = settings_from_args(SearchSettings, args)
    if args.importance_metric == "ppl":  # the reference's published commands: its exact perplexity scoring
        search = replace(search, objective="nll", screen_tokens=0, width_screen="forward")
    job = PruneJob(
        model=settings_from_args(ModelSettings, args),
        calibration=settings_from_args(CalibrationSettings, args),
        search=search,
        evaluation=settings_from_args(EvalSettings, args, prefix="eval-"),
        compensation=settings_from_args(CompensateSettings, args, prefix="compensate-"),
        recovery=settings_from_args(RecoverSettings, args, prefix="recover-"),
        run=settings_from_args(RunOptions, args),
        progress=not args.quiet,
    )
    _check_prune_inputs(job)
    run = prune(job)
    if run is not None:  # None: a torchrun process other than rank 0
        print(prune_summary(run))


def _check_prune_inputs(job) -> None:
    """The job's settings and output, its model's files, and every text it will read."""
    from ..run.run_dir import RunDirectory
    from ..search.calibration import check_source

    job.validate()
    job.model.check(dense=True)
    # a resumed search reads its stored calibration sets; compensation draws fresh tokens from the source
    fresh = not RunDirectory(job.output_dir()).exists()
    if fresh or (job.run.compensate and job.compensation.tokens):
        job.calibration.check_source()
    if job.run.recover:
        check_source(job.recovery.data)
    if job.run.do_eval:
        job.evaluation.check_tasks()
