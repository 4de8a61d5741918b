"""Command-line interface: `multipruner prune | extract | compensate | recover | inspect | eval | bench | export | report`.

Flags come from the settings dataclasses (``cli_options``); ``prune`` also accepts the reference's flag
spellings, so the authors' published commands run with only the program name changed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from dataclasses import replace
from pathlib import Path

from .cli_options import add_settings, settings_from_args
from .errors import UsageError

log = logging.getLogger("multipruner")


class CliError(UsageError):
    pass


def _check_output_file(path: str | None) -> None:
    """Fail before a long measurement if its result could not be written."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise CliError(f"--output {path} is a directory; give a file name such as {target / 'eval.json'}")
    parent = target.parent if str(target.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise CliError(f"--output {path}: {parent} is not a directory")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise CliError(f"--output {path}: cannot write into {parent} (permission denied)")


# --- prune --------------------------------------------------------------------------------------
def add_prune(sub) -> None:
    from .search.calibration import CalibrationSettings
    from .repair.compensate import CompensateSettings
    from .evaluation.runner import EvalSettings
    from .models import ModelSettings
    from .run.pipeline import RunOptions
    from .repair.recover import RecoverSettings
    from .search.loop import SearchSettings

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
    ref.add_argument("--importance_metric", "--importance-metric", choices=["ppl"], default="ppl")
    ref.add_argument(
        "--pruned_model_config_file",
        default=None,
        help="with --do_eval and no --do_prune: evaluate this plan",
    )
    p.set_defaults(func=cmd_prune)


def cmd_prune(args) -> None:
    from .search.calibration import CalibrationSettings
    from .repair.compensate import CompensateSettings
    from .evaluation.runner import EvalSettings
    from .models import ModelSettings
    from .run.pipeline import PruneJob, RunOptions, prune
    from .repair.recover import RecoverSettings
    from .search.loop import SearchSettings

    if args.do_eval and not args.do_prune and args.pruned_model_config_file:
        # the reference's evaluation-only mode
        args.plan, args.output, args.task_file = args.pruned_model_config_file, None, []
        args.weight_reorder = True
        for name in ("tasks", "limit", "seqlen", "batch_size"):
            setattr(args, name, getattr(args, f"eval_{name}"))
        return cmd_eval(args)
    job = PruneJob(
        model=settings_from_args(ModelSettings, args),
        calibration=settings_from_args(CalibrationSettings, args),
        search=settings_from_args(SearchSettings, args),
        evaluation=settings_from_args(EvalSettings, args, prefix="eval-"),
        compensation=settings_from_args(CompensateSettings, args, prefix="compensate-"),
        recovery=settings_from_args(RecoverSettings, args, prefix="recover-"),
        run=settings_from_args(RunOptions, args),
        progress=not args.quiet,
    )
    run = prune(job)
    if run is not None:  # None: a torchrun process other than rank 0
        print(prune_summary(run))


def prune_summary(run) -> str:
    """The before/after table a prune run ends with, from what it wrote."""
    from .evaluation.results import EvalResult
    from .run.run_dir import MODEL_STAGES
    from .tables import render_table

    manifest = run.manifest()
    plan, layout = run.plan()
    dense = run.dense_record()
    final = manifest.phases.get("search", {}).get("final_ppl", {})
    rows = [
        ("parameters", f"{layout.dense_params():,}", f"{plan.num_params(layout):,}"),
        ("calibration ppl, block set", f"{dense.ppl:.3f}", f"{final.get('block', float('nan')):.3f}"),
        ("calibration ppl, width set", f"{dense.ppl_width:.3f}", f"{final.get('width', float('nan')):.3f}"),
    ]
    evals = {
        w: EvalResult.read(run.eval_file(w)) for w in ("dense", *MODEL_STAGES) if run.eval_file(w).is_file()
    }
    header = ("", "dense", "pruned")
    if "dense" in evals and len(evals) > 1:
        stages = [w for w in evals if w != "dense"]
        header = ("", "dense", *stages)
        rows = [(*row, *[""] * (len(stages) - 1)) for row in rows]
        for task in evals["dense"].tasks:
            name, base = evals["dense"].headline(task)
            scale, spec = (1, ".2f") if name == "ppl" else (100, ".1f")
            values = [
                format(evals[w].headline(task)[1].value * scale, spec) if task in evals[w].tasks else "—"
                for w in stages
            ]
            rows.append((f"{task} {name}", format(base.value * scale, spec), *values))
    steps = manifest.phases.get("search", {}).get("steps", 0)
    lines = [
        render_table(header, rows),
        f"pruning ratio {plan.ratio(layout):.2f}% after {steps} steps; run directory {run.path}",
        "plan: " + json.dumps(plan.to_reference()),
    ]
    return "\n".join(lines)


# --- extract / inspect --------------------------------------------------------------------------
def _add_plan_flags(p) -> None:
    p.add_argument(
        "--weight-reorder",
        "--weight_reorder",
        dest="weight_reorder",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reorder before slicing (reference-format plans need it if they were searched with it; "
        "our plans record it)",
    )
    p.add_argument(
        "--activation-order",
        action="store_true",
        help="order the channels by their activations on the calibration sets, as a search with "
        "--channel-importance activations did, for a plan that does not store that order (the reference "
        "format, docs/quality.json); give the search's calibration flags (the defaults give the defaults' order)",
    )


def _activation_order_calibration(args, plan_data: dict):
    """The calibration sets' settings --activation-order recomputes the order on, checked before any
    model loads: the plan must not store an order already, and must be one whose channels are reordered."""
    from .search.calibration import CalibrationSettings

    if plan_data.get("channel_order"):
        raise CliError(f"{args.plan} stores its channel order; leave out --activation-order")
    reorder = (
        args.weight_reorder if args.weight_reorder is not None else plan_data.get("weight_reorder", True)
    )
    if not reorder:
        raise CliError("--activation-order reorders channels; it cannot go with --no-weight-reorder")
    calibration = settings_from_args(CalibrationSettings, args)
    calibration.validate()
    return calibration


def add_extract(sub) -> None:
    from .search.calibration import CalibrationSettings
    from .models import ModelSettings

    p = sub.add_parser(
        "extract", help="apply a plan (ours or the reference's pruning_config.json) and save a smaller model"
    )
    add_settings(p, ModelSettings)
    p.add_argument("--plan", required=True)
    p.add_argument("--output", "--output_path", dest="output", required=True)
    _add_plan_flags(p)
    p.add_argument("--overwrite", action="store_true")
    add_settings(p, CalibrationSettings, title="calibration text (only read with --activation-order)")
    p.set_defaults(func=cmd_extract)


def _load_dense_and_plan(args, activation_order: bool = False):
    """The dense model and the plan; with ``activation_order``, the plan's channel order recomputed
    from the calibration flags (for a plan searched that way that does not store its order)."""
    from .core.layout import layout_of
    from .models import ModelSettings, describe_source
    from .core.plan import check_plan_file, load_plan
    from .core.reorder import calibration_channel_order

    data = check_plan_file(args.plan)  # a missing, malformed or impossible plan fails before the model loads
    calibration = _activation_order_calibration(args, data) if activation_order else None
    model, tokenizer = settings_from_args(ModelSettings, args).load()
    layout = layout_of(model)
    plan = load_plan(args.plan, layout, weight_reorder=args.weight_reorder)
    plan = replace(plan, meta={**plan.meta, "source": describe_source(args.model)})
    if calibration is not None:
        order = calibration_channel_order(model, calibration.build(tokenizer), calibration.batch_size)
        plan = replace(plan, channel_order=order)
    return model, tokenizer, layout, plan


def cmd_extract(args) -> None:
    from .core.checkpoint import save_pruned
    from .core.extract import extract
    from .core.surgery import PrunableModel
    from .core.inspect_model import format_layer_table

    if Path(args.output).exists() and not args.overwrite:
        raise CliError(f"{args.output} exists; pass --overwrite to replace it")
    model, tokenizer, layout, plan = _load_dense_and_plan(args, args.activation_order)
    pruned = extract(PrunableModel.from_plan(model, plan), plan)
    save_pruned(pruned, tokenizer, args.output, plan, layout, overwrite=args.overwrite)
    print(format_layer_table(pruned))
    print(
        f"pruning ratio {plan.ratio(layout):.2f}% ({layout.dense_params():,} -> {plan.num_params(layout):,}); "
        f"saved to {args.output}"
    )


def add_compensate(sub) -> None:
    from .search.calibration import CalibrationSettings
    from .repair.compensate import CompensateSettings
    from .models import ModelSettings

    p = sub.add_parser(
        "compensate",
        help="extract a plan and refit its narrowed branches in closed form (no training); save the model",
    )
    add_settings(p, ModelSettings)
    p.add_argument("--plan", required=True, help="our plan.json or the reference's pruning_config.json")
    p.add_argument("--output", "--output_path", dest="output", required=True)
    _add_plan_flags(p)
    p.add_argument("--overwrite", action="store_true")
    add_settings(p, CompensateSettings, title="compensation")
    add_settings(
        p, CalibrationSettings, title="calibration text (its token budgets size the default compensation set)"
    )
    p.set_defaults(func=cmd_compensate)


def cmd_compensate(args) -> None:
    from .search.calibration import CalibrationSettings
    from .repair.compensate import CompensateSettings, compensate, compensation_summary
    from .core.checkpoint import save_pruned
    from .core.extract import extract
    from .core.surgery import PrunableModel
    from .tables import render_table

    settings = settings_from_args(CompensateSettings, args)
    settings.validate()
    calibration = settings_from_args(CalibrationSettings, args)
    calibration.validate()
    if Path(args.output).exists() and not args.overwrite:
        raise CliError(f"{args.output} exists; pass --overwrite to replace it")
    model, tokenizer, layout, plan = _load_dense_and_plan(args, args.activation_order)
    prunable = PrunableModel.from_plan(model, plan)
    tokens = settings.calibration_tokens(calibration, None, tokenizer)
    pruned = extract(prunable, plan)
    fits = compensate(prunable, pruned, plan, tokens, settings, batch_size=calibration.batch_size)
    plan = replace(plan, meta={**plan.meta, "compensation": compensation_summary(fits, settings, tokens)})
    save_pruned(pruned, tokenizer, args.output, plan, layout, overwrite=args.overwrite)
    rows = [
        (
            f.layer,
            f.kind,
            f"{f.kept}/{f.full}",
            f"{f.error_before:.4g}",
            f"{f.error_after:.4g}",
            f"{f.error_after / f.error_before:.3f}" if f.error_before else "—",
        )
        for f in fits
    ]
    print(
        render_table(
            ("layer", "branch", "kept", "error before", "error after", "ratio"), rows, align="rllrrr"
        )
    )
    print(f"compensated {len(fits)} branches on {tokens.numel()} tokens; saved to {args.output}")


def add_recover(sub) -> None:
    from .models import ModelSettings
    from .repair.recover import RecoverSettings

    p = sub.add_parser("recover", help="LoRA recovery fine-tuning of a pruned model, merged into its weights")
    add_settings(p, ModelSettings, skip=("model",))
    p.add_argument("--model", "--model_path", dest="model", required=True, help="a pruned model directory")
    p.add_argument("--output", required=True, help="where the recovered (merged) model goes")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--overwrite", action="store_true")
    add_settings(p, RecoverSettings, title="recovery")
    p.set_defaults(func=cmd_recover)


def cmd_recover(args) -> None:
    from .models import ModelSettings, is_pruned_dir
    from .repair.recover import RecoverSettings, recover

    settings = settings_from_args(RecoverSettings, args)
    settings.validate()
    if not Path(args.model).is_dir() or not is_pruned_dir(Path(args.model)):
        raise CliError(
            f"{args.model} is not a pruned model directory (prune --extract or extract writes one)"
        )
    model = settings_from_args(ModelSettings, args, model=args.model)
    summary = recover(
        args.model,
        args.output,
        settings,
        resume=args.resume,
        overwrite=args.overwrite,
        dtype=model.torch_dtype(),
        device=model.torch_device(),
        progress=not args.quiet,
    )
    print(
        f"recovered in {summary['steps']} steps: training loss {summary['first_loss']:.3f} -> "
        f"{summary['last_loss']:.3f} (mean of the last 5); saved to {args.output} (adapter in {args.output}/adapter)"
    )


def add_inspect(sub) -> None:
    from .models import ModelSettings

    p = sub.add_parser("inspect", help="layer-by-layer table of a dense or pruned model")
    add_settings(p, ModelSettings)
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> None:
    from .core.inspect_model import format_layer_table
    from .models import ModelSettings

    model, _ = settings_from_args(ModelSettings, args).load()
    print(format_layer_table(model))


# --- eval / bench / report ------------------------------------------------------------------------
def add_eval(sub) -> None:
    from .evaluation.runner import EvalSettings
    from .models import ModelSettings

    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy (lm-eval with offline task files)")
    add_settings(p, ModelSettings)
    add_settings(p, EvalSettings, defaults={"limit": None})
    p.add_argument("--plan", default=None, help="evaluate the dense model with this plan applied")
    _add_plan_flags(p)
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
    from .evaluation.runner import EvalSettings, evaluate
    from .core.checkpoint import PLAN_FILENAME
    from .models import ModelSettings

    settings = settings_from_args(EvalSettings, args)
    settings.validate()
    overrides = _task_files(args.task_file)
    _check_output_file(args.output)
    dense_params = None
    if args.plan:
        from .core.extract import extract
        from .core.surgery import PrunableModel

        model, tokenizer, layout, plan = _load_dense_and_plan(args)
        model, dense_params = (
            extract(PrunableModel.from_plan(model, plan), plan),
            layout.dense_params(),
        )
    else:
        model, tokenizer = settings_from_args(ModelSettings, args).load()
        plan_file = Path(args.model) / PLAN_FILENAME
        if plan_file.is_file():
            dense_params = json.loads(plan_file.read_text()).get("params", {}).get("dense")
    result = evaluate(
        model, tokenizer, settings, name=args.model, dense_params=dense_params, overrides=overrides or None
    )
    print(format_eval(result))
    if args.output:
        result.write(args.output)


def format_eval(result) -> str:
    from .tables import render_table

    rows = []
    for task in result.tasks:
        name, metric = result.headline(task)
        value = f"{metric.value:.3f}" if name == "ppl" else f"{100 * metric.value:.2f}"
        error = "" if metric.stderr is None else f"± {100 * metric.stderr:.2f}"
        rows.append((task, name if name == "ppl" else f"{name} (%)", value, error, metric.n or ""))
    meta = result.meta
    return "\n".join(
        [
            render_table(("task", "metric", "value", "stderr", "n"), rows, align="llrrr"),
            f"{meta.params:,} parameters" + (f" ({meta.ratio:.2f}% pruned)" if meta.dense_params else ""),
        ]
    )


def add_bench(sub) -> None:
    from .evaluation.speed import BenchSettings
    from .models import ModelSettings

    p = sub.add_parser("bench", help="prefill/decode speed, memory and size: dense and pruned side by side")
    add_settings(p, ModelSettings)
    add_settings(p, BenchSettings)
    p.add_argument(
        "--dense", default=None, help="the dense model to compare with (default: the pruned model's source)"
    )
    p.add_argument("--output", default=None, help="JSON result path (e.g. RUN_DIR/bench.json)")
    p.set_defaults(func=cmd_bench)


def dense_source_of(model_dir: str) -> str | None:
    """The dense model a saved pruned model came from, as recorded in its plan (None if unknown)."""
    from .core.checkpoint import PLAN_FILENAME
    from .run.run_dir import ModelSource

    plan_file = Path(model_dir) / PLAN_FILENAME
    if not plan_file.is_file():
        return None
    meta = json.loads(plan_file.read_text()).get("meta", {})
    if "source" in meta:
        return ModelSource.from_dict(meta["source"]).loadable()
    return meta.get("source_model")  # models saved before the source was recorded


def cmd_bench(args) -> None:
    from .evaluation.speed import BenchSettings, compare_speed, format_speed_table, measure_side_by_side
    from .io_utils import atomic_write_text
    from .models import ModelSettings

    settings = settings_from_args(BenchSettings, args)
    settings.validate()
    _check_output_file(args.output)
    dense_spec = args.dense or dense_source_of(args.model)
    if dense_spec is None:
        raise CliError(f"cannot tell which dense model {args.model} came from; pass --dense")
    model_settings = settings_from_args(ModelSettings, args)
    pruned, _ = model_settings.load()
    dense, _ = replace(model_settings, model=dense_spec).load()
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
    if args.output:
        atomic_write_text(Path(args.output), json.dumps(comparison, indent=2) + "\n")


# --- export -------------------------------------------------------------------------------------
def add_export(sub) -> None:
    from .export.gguf import GGUFExportSettings
    from .models import ModelSettings

    p = sub.add_parser(
        "export", help="write a dense or pruned model as GGUF for llama.cpp (deci architecture)"
    )
    add_settings(p, ModelSettings)
    p.add_argument("--format", choices=("gguf",), default="gguf", help="output format (default: gguf)")
    add_settings(p, GGUFExportSettings)
    p.add_argument("--output", required=True, help="the .gguf file to write")
    p.set_defaults(func=cmd_export)


def vocabulary_gguf(spec: str) -> Path | None:
    """The GGUF file whose vocabulary a model uses: the model's own, or its dense source's (pruned dirs)."""
    from .models import EMBEDDED

    if Path(spec).is_dir():
        source = dense_source_of(spec)
        return None if source is None else vocabulary_gguf(source)
    if spec in EMBEDDED:
        return EMBEDDED[spec].gguf_path()
    return Path(spec) if spec.endswith(".gguf") and Path(spec).is_file() else None


def _display_name(spec: str) -> str:
    """``runs/smol10/model`` -> ``smol10-model``: the run says more than the folder name ``model``."""
    path = Path(spec)
    return f"{path.resolve().parent.name}-{path.name}" if path.is_dir() else path.stem


def cmd_export(args) -> None:
    from .export.gguf import GGUFExportSettings, check_output, export_gguf
    from .models import ModelSettings

    settings = settings_from_args(GGUFExportSettings, args)
    output = Path(args.output)
    check_output(output, settings.overwrite)
    model_settings = replace(settings_from_args(ModelSettings, args), dtype="float32", device="cpu")
    model, tokenizer = model_settings.load()
    vocab = vocabulary_gguf(args.model)
    path = export_gguf(
        model,
        output,
        outtype=settings.outtype,
        overwrite=settings.overwrite,
        tokenizer=tokenizer,
        tokenizer_dir=Path(args.model) if Path(args.model).is_dir() else None,
        tokenizer_gguf=vocab,
        name=_display_name(args.model),
    )
    size = path.stat().st_size / 2**20
    print(f"wrote {path} ({size:.1f} MiB, {settings.outtype}, vocabulary from {vocab or args.model})")


def add_report(sub) -> None:
    p = sub.add_parser("report", help="report.md and figures for a run directory")
    p.add_argument("run_dir")
    p.add_argument("--out-dir", default=None)
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> None:
    from .report import write_report

    print(write_report(args.run_dir, args.out_dir))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multipruner", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("-q", "--quiet", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        add_prune,
        add_extract,
        add_compensate,
        add_recover,
        add_inspect,
        add_eval,
        add_bench,
        add_export,
        add_report,
    ):
        add(sub)
    return parser


def _attach_negative_values(argv: list[str]) -> list[str]:
    """``--distribution -1:1:1`` -> ``--distribution=-1:1:1``: argparse would read the value as an option
    and say only "expected one argument"; attached, it reaches the setting's own check and message."""
    out: list[str] = []
    for token in argv:
        if re.match(r"^-\d", token) and out and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _attach_negative_values(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    try:
        args.func(args)
    except (UsageError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError) as err:
        print(f"multipruner {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
