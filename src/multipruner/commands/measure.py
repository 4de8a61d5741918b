"""The commands that look at a model: ``inspect`` (its layers), ``eval`` (perplexity and zero-shot
accuracy) and ``bench`` (speed, memory and size, dense and pruned side by side)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..cli_options import add_settings, settings_from_args
from . import CliError
from .plan_flags import add_plan_flags


def add_inspect(sub) -> None:
    from ..models import ModelSettings

    p = sub.add_parser("inspect", help="layer-by-layer table of a dense or pruned model")
    add_settings(p, ModelSettings)
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> None:
    from ..core.inspect_model import format_layer_table
    from ..models import ModelSettings

    model = settings_from_args(ModelSettings, args)
    model.check(tokenizer=False)
    loaded, _ = model.load()
    print(format_layer_table(loaded))


def add_eval(sub) -> None:
    from ..evaluation.runner import EvalSettings
    from ..models import ModelSettings

    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy (lm-eval with offline task files)")
    add_settings(p, ModelSettings)
    add_settings(p, EvalSettings, defaults={"limit": None})
    p.add_argument("--plan", default=None, help="evaluate the dense model with this plan applied")
    add_plan_flags(p)
    p.add_argument(
        "--task-file",
        action="append",
        default=[],
        metavar="TASK=PATH",
        help="local data file for a task, e.g. winogrande=winogrande_dev.jsonl",
    )
    p.add_argument("--output", default=None, help="JSON result path (a CSV is written beside it)")
    p.set_defaults(func=cmd_eval)


def _task_files(items: list[str]) -> dict[str, str]:
    bad = [item for item in items if "=" not in item]
    if bad:
        raise CliError(f"--task-file takes TASK=PATH (e.g. winogrande=dev.jsonl), got {bad[0]!r}")
    return dict(item.split("=", 1) for item in items)


def cmd_eval(args) -> None:
    from ..evaluation.runner import EvalSettings
    from ..models import ModelSettings
    from ..run.planned_model import PlanRequest
    from ..search.calibration import CalibrationSettings

    if args.activation_order and not args.plan:
        raise CliError("--activation-order reorders a plan's channels; give the plan with --plan")
    # eval has no calibration flags (its --seqlen is the perplexity window): the default sets' order
    calibration = CalibrationSettings() if args.activation_order else None
    evaluate(
        settings_from_args(ModelSettings, args),
        settings_from_args(EvalSettings, args),
        plan=PlanRequest(args.plan, args.weight_reorder, calibration) if args.plan else None,
        overrides=_task_files(args.task_file),
        output=args.output,
    )


def evaluate(model, settings, *, plan=None, overrides: dict[str, str] | None = None, output=None) -> None:
    """``eval`` and the reference's evaluation-only ``prune``: check every input, evaluate, print, write."""
    from ..io_utils import check_output
    from ..run.evaluate_model import evaluate_model

    settings.validate()
    if output is not None:
        check_output(output, example="eval.json")
    settings.check_tasks(overrides)
    if plan is not None:
        plan.check(texts=True)
    model.check(dense=plan is not None)
    result = evaluate_model(model, settings, plan=plan, overrides=overrides)
    print(result.format_table())
    if output is not None:
        result.write(output)


def add_bench(sub) -> None:
    from ..evaluation.speed import BenchSettings
    from ..models import ModelSettings

    p = sub.add_parser("bench", help="prefill/decode speed, memory and size: dense and pruned side by side")
    add_settings(p, ModelSettings)
    add_settings(p, BenchSettings)
    p.add_argument(
        "--dense", default=None, help="the dense model to compare with (default: the pruned model's source)"
    )
    p.add_argument("--output", default=None, help="JSON result path (e.g. RUN_DIR/bench.json)")
    p.set_defaults(func=cmd_bench)


def _latency_budget(model: str) -> dict | None:
    """The latency budget a pruned model directory's plan was searched for, if any."""
    from ..core.checkpoint import saved_plan_data

    data = saved_plan_data(model) if Path(model).is_dir() else None
    budget = ((data or {}).get("meta") or {}).get("budget")
    return budget if budget and budget.get("workload") else None


def cmd_bench(args) -> None:
    from ..evaluation.speed import BenchSettings, measure_side_by_side
    from ..evaluation.speed_comparison import compare_speed, format_speed_table
    from ..io_utils import atomic_write_text, check_output
    from ..model_sources import EMBEDDED, dense_source_of
    from ..models import ModelSettings

    settings = settings_from_args(BenchSettings, args)
    settings.validate()
    if args.output is not None:
        check_output(args.output, example="bench.json")
    model_settings = settings_from_args(ModelSettings, args)
    if args.dense is None and args.model not in EMBEDDED and not Path(args.model).exists():
        raise CliError(f"--model {args.model} does not exist: give a pruned model directory (or --dense)")
    model_settings.check(tokenizer=False)
    dense_spec = args.dense or dense_source_of(args.model)
    if dense_spec is None:
        raise CliError(f"cannot tell which dense model {args.model} came from; pass --dense")
    dense_settings = replace(model_settings, model=dense_spec)
    dense_settings.check(tokenizer=False)
    pruned, _ = model_settings.load()
    dense, _ = dense_settings.load()
    disk = {"pruned": args.model}
    if Path(dense_spec).exists():
        disk["dense"] = dense_spec
    results = measure_side_by_side(
        {"dense": dense, "pruned": pruned},
        batch_size=settings.batch_size,
        seqlen=settings.seqlen,
        new_tokens=settings.new_tokens,
        repeats=settings.repeats,
        disk_paths=disk,
    )
    comparison = compare_speed(results)
    print(format_speed_table(comparison))
    if budget := _latency_budget(args.model):
        from ..search.latency import measured_speedup

        kind, batch_size, context = budget["workload"]
        speedup = measured_speedup(dense, pruned, budget["workload"], settings.repeats)
        comparison["budget"] = {**budget, "measured_speedup": speedup, "repeats": settings.repeats}
        print(
            f"budget {budget['text']}: measured {kind} speed-up {speedup:.3f}x (batch {batch_size}, context "
            f"{context}, the median of {settings.repeats}, as the search's latency table timed it)"
        )
    if args.output:
        atomic_write_text(Path(args.output), json.dumps(comparison, indent=2) + "\n")
