"""Command-line interface: `multipruner prune | extract | inspect | eval | bench | report`.

`prune` accepts the reference's flags under their own names (so the authors' commands run unchanged
apart from the program name) and friendlier spellings of each.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

log = logging.getLogger("multipruner")

DEFAULT_EVAL_TASKS = "wikitext2,piqa,arc_easy,boolq,hellaswag"


class CliError(Exception):
    pass


def parse_distribution(text: str) -> tuple[float, float, float]:
    parts = text.split(":")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise argparse.ArgumentTypeError(
            f"pruning distribution must be three non-negative numbers a:b:c with a positive sum (e.g. 44:52:4), got {text!r}"
        )
    return values


def _tasks(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# --- prune ------------------------------------------------------------------------------
def add_prune(sub) -> None:
    p = sub.add_parser(
        "prune", help="search what to remove (blocks, MLP channels, heads) and optionally extract it"
    )
    p.add_argument(
        "--model_path",
        "--model",
        dest="model",
        default="smollm2-135m",
        help="HF directory, .gguf file, hub id, or embedded short name (smollm2-135m, gemma3-270m)",
    )
    p.add_argument(
        "--output_path",
        "--output",
        dest="output_path",
        default=None,
        help="run directory (default runs/<model>)",
    )
    p.add_argument(
        "--weight_reorder",
        "--weight-reorder",
        dest="weight_reorder",
        action="store_true",
        default=True,
        help="reorder channels by L1 importance first (default: on)",
    )
    p.add_argument("--no-weight-reorder", dest="weight_reorder", action="store_false")
    p.add_argument(
        "--do_prune",
        "--do-prune",
        action="store_true",
        help="run the search (default when --do_eval is not given alone)",
    )
    p.add_argument(
        "--target_ratio", "--target-ratio", type=float, default=10.0, help="target pruning ratio in percent"
    )
    p.add_argument(
        "--pruning_distribution",
        "--distribution",
        dest="distribution",
        type=parse_distribution,
        default=(44.0, 52.0, 4.0),
        help="share of the ratio for blocks:mlp-channels:heads (default 44:52:4)",
    )
    p.add_argument(
        "--mlp_channel_group_size", "--mlp-group-size", dest="mlp_group_size", type=int, default=None
    )
    p.add_argument(
        "--attn_channel_group_size", "--attn-group-size", dest="attention_group_size", type=int, default=None
    )
    p.add_argument("--importance_metric", "--importance-metric", choices=["ppl"], default="ppl")
    p.add_argument(
        "--calibration_dataset",
        "--calibration",
        dest="calibration_dataset",
        default="default",
        help="alpaca | wikitext2 | c4 | ptb | piqa | path to .txt/.json/.jsonl | default (offline PIQA text)",
    )
    p.add_argument(
        "--num_calibration_samples_block",
        "--block-samples",
        dest="num_calibration_samples_block",
        type=int,
        default=64,
    )
    p.add_argument(
        "--num_calibration_samples_width",
        "--width-samples",
        dest="num_calibration_samples_width",
        type=int,
        default=32,
    )
    p.add_argument(
        "--do_eval", "--do-eval", action="store_true", help="evaluate dense and pruned models at the end"
    )
    p.add_argument(
        "--pruned_model_config_file", default=None, help="with --do_eval alone: the plan to evaluate"
    )
    p.add_argument("--batch_size", "--batch-size", type=int, default=2, help="calibration batch size")
    p.add_argument("--seqlen", type=int, default=512, help="calibration sequence length (reference: 2048)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int, default=None)
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --output_path from its last finished step"
    )
    p.add_argument("--extract", action="store_true", help="save the pruned model to <output_path>/model")
    p.add_argument("--eval-tasks", default=DEFAULT_EVAL_TASKS, type=_tasks)
    p.add_argument("--eval-limit", type=int, default=200, help="examples per zero-shot task (0: all)")
    p.add_argument("--eval-seqlen", type=int, default=2048, help="perplexity window (the papers: 2048)")
    p.set_defaults(func=cmd_prune)


def cmd_prune(args) -> None:
    from .pipeline import PruneJob, prune

    output = args.output_path or str(Path("runs") / Path(args.model).name.replace(".gguf", ""))
    if args.do_eval and not args.do_prune and args.pruned_model_config_file:
        # the reference's evaluation-only mode
        args.plan, args.tasks, args.limit, args.output = (
            args.pruned_model_config_file,
            args.eval_tasks,
            args.eval_limit,
            None,
        )
        args.seqlen = 2048
        return cmd_eval(args)
    job = PruneJob(
        model=args.model,
        output_path=output,
        target_ratio=args.target_ratio,
        distribution=args.distribution,
        mlp_group_size=args.mlp_group_size,
        attention_group_size=args.attention_group_size,
        weight_reorder=args.weight_reorder,
        calibration_dataset=args.calibration_dataset,
        num_calibration_samples_block=args.num_calibration_samples_block,
        num_calibration_samples_width=args.num_calibration_samples_width,
        seqlen=args.seqlen,
        dtype=args.dtype,
        device=args.device,
        batch_size=args.batch_size,
        seed=args.seed,
        max_steps=args.max_steps,
        resume=args.resume,
        extract=args.extract,
        do_eval=args.do_eval,
        eval_tasks=args.eval_tasks,
        eval_limit=args.eval_limit or None,
        eval_seqlen=args.eval_seqlen,
    )
    summary = prune(job)
    rows = [
        ("parameters", f"{summary['dense_params']:,}", f"{summary['pruned_params']:,}"),
        (
            "calibration ppl (block set)",
            f"{summary['dense_ppl_block']:.3f}",
            f"{summary['pruned_ppl_block']:.3f}",
        ),
        (
            "calibration ppl (width set)",
            f"{summary['dense_ppl_width']:.3f}",
            f"{summary['pruned_ppl_width']:.3f}",
        ),
    ]
    for key, value in summary.get("eval", {}).get("pruned", {}).items():
        dense = summary["eval"]["dense"].get(key)
        if key.startswith("ppl_") or (isinstance(value, float) and key not in ("ratio",)):
            rows.append((key, f"{dense:.2f}" if isinstance(dense, float) else str(dense), f"{value:.2f}"))
    print(_table(("", "dense", "pruned"), rows))
    print(
        f"pruning ratio {summary['ratio']:.2f}% in {summary['wall_s']:.0f}s; run directory {summary['output_path']}"
    )
    print("plan:", json.dumps(summary["plan"]))


def _table(header, rows) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{widths[0]}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths)).replace(
        "{:>", "{:>"
    )
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


# --- extract / inspect ---------------------------------------------------------------------
def add_extract(sub) -> None:
    p = sub.add_parser(
        "extract", help="apply a plan (ours or the reference's pruning_config.json) and save a smaller model"
    )
    p.add_argument("--model", "--model_path", dest="model", default="smollm2-135m")
    p.add_argument("--plan", required=True)
    p.add_argument("--output", "--output_path", dest="output", required=True)
    p.add_argument(
        "--weight-reorder",
        "--weight_reorder",
        dest="weight_reorder",
        action="store_true",
        default=None,
        help="reorder before slicing (reference-format plans need this if they were searched with it)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_extract)


def _load_dense_and_plan(model_spec: str, plan_path: str, weight_reorder, dtype: str):
    from .layout import layout_of
    from .models import load_model
    from .plan import load_plan, read_plan_file

    read_plan_file(plan_path)  # a missing or broken plan fails before the model loads
    model, tokenizer = load_model(model_spec, dtype=dtype)
    layout = layout_of(model)
    plan = load_plan(plan_path, layout, weight_reorder=weight_reorder)
    plan = replace(plan, meta={**plan.meta, "source_model": model_spec})
    return model, tokenizer, layout, plan


def cmd_extract(args) -> None:
    from .export import extract, prepare_dense, save_pruned
    from .inspect_model import format_layer_table

    if Path(args.output).exists() and not args.overwrite:
        raise CliError(f"{args.output} exists; pass --overwrite to replace it")
    model, tokenizer, layout, plan = _load_dense_and_plan(
        args.model, args.plan, args.weight_reorder, args.dtype
    )
    pruned = extract(prepare_dense(model, plan.weight_reorder), plan)
    save_pruned(pruned, tokenizer, args.output, plan, layout, overwrite=args.overwrite)
    print(format_layer_table(pruned))
    print(
        f"pruning ratio {plan.ratio(layout):.2f}% ({layout.dense_params():,} -> {plan.num_params(layout):,}); saved to {args.output}"
    )


def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="layer-by-layer table of a dense or pruned model")
    p.add_argument("--model", "--model_path", dest="model", default="smollm2-135m")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> None:
    from .inspect_model import format_layer_table
    from .models import load_model

    model, _ = load_model(args.model)
    print(format_layer_table(model))


# --- eval / bench / report ---------------------------------------------------------------
def add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="WikiText-2 perplexity and zero-shot accuracy (lm-eval, offline task files)"
    )
    p.add_argument("--model", "--model_path", dest="model", default="smollm2-135m")
    p.add_argument("--plan", default=None, help="evaluate the dense model with this plan applied")
    p.add_argument("--weight-reorder", dest="weight_reorder", action="store_true", default=None)
    p.add_argument(
        "--tasks",
        type=_tasks,
        default=_tasks(DEFAULT_EVAL_TASKS),
        help="comma list: wikitext2, ptb, c4, a .txt path, piqa, winogrande, hellaswag, arc_easy, arc_challenge, boolq, openbookqa",
    )
    p.add_argument("--limit", type=int, default=None, help="examples per zero-shot task")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8)
    p.add_argument(
        "--task-file",
        action="append",
        default=[],
        metavar="TASK=PATH",
        help="local data file for a task, e.g. winogrande=winogrande_dev.jsonl",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--output", default=None, help="JSON result path (a CSV is written beside it)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> None:
    from .evaluation.runner import evaluate, write_results
    from .models import load_model

    overrides = dict(item.split("=", 1) for item in getattr(args, "task_file", []))
    dense_params = None
    if args.plan:
        from .export import extract, prepare_dense

        model, tokenizer, layout, plan = _load_dense_and_plan(
            args.model, args.plan, args.weight_reorder, args.dtype
        )
        model, dense_params = extract(prepare_dense(model, plan.weight_reorder), plan), layout.dense_params()
    else:
        model, tokenizer = load_model(args.model, dtype=args.dtype)
        plan_file = Path(args.model) / "multipruner_plan.json"
        if plan_file.is_file():
            dense_params = json.loads(plan_file.read_text()).get("params", {}).get("dense")
    result = evaluate(
        model,
        tokenizer,
        args.tasks,
        limit=args.limit,
        seqlen=args.seqlen,
        batch_size=getattr(args, "batch_size", 8),
        dense_params=dense_params,
        overrides=overrides or None,
    )
    shown = {k: v for k, v in result.items() if k != "details"}
    print(json.dumps(shown, indent=2))
    if args.output:
        write_results(result, args.output)


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="prefill/decode speed, memory and size: dense and pruned side by side")
    p.add_argument(
        "--model", "--model_path", dest="model", required=True, help="a pruned model directory (or any model)"
    )
    p.add_argument(
        "--dense", default=None, help="the dense model to compare with (default: the pruned model's source)"
    )
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--output", default=None, help="JSON result path (e.g. RUN_DIR/bench.json)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> None:
    from .evaluation.speed import compare_speed, directory_size_mb, format_speed_table, measure_side_by_side
    from .io_utils import atomic_write_text
    from .models import load_model

    pruned, _ = load_model(args.model, dtype=args.dtype)
    dense_spec = args.dense
    plan_file = Path(args.model) / "multipruner_plan.json"
    if dense_spec is None and plan_file.is_file():
        dense_spec = json.loads(plan_file.read_text()).get("meta", {}).get("source_model")
    if dense_spec is None:
        raise CliError("cannot tell which dense model to compare with; pass --dense")
    dense, _ = load_model(dense_spec, dtype=args.dtype)
    results = measure_side_by_side(
        {"dense": dense, "pruned": pruned},
        batch_size=args.batch_size,
        seqlen=args.seqlen,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
    )
    disk = {"pruned": directory_size_mb(args.model)}
    if Path(dense_spec).exists():
        disk["dense"] = directory_size_mb(dense_spec)
    results = {k: replace(v, disk_mb=disk.get(k, v.disk_mb)) for k, v in results.items()}
    comparison = compare_speed(results)
    print(format_speed_table(comparison))
    if args.output:
        atomic_write_text(Path(args.output), json.dumps(comparison, indent=2) + "\n")


def add_report(sub) -> None:
    p = sub.add_parser("report", help="report.md and figures for a run directory")
    p.add_argument("run_dir")
    p.add_argument("--out-dir", default=None)
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> None:
    from .evaluation.report import write_report

    print(write_report(args.run_dir, args.out_dir))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multipruner", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("-q", "--quiet", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_prune, add_extract, add_inspect, add_eval, add_bench, add_report):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    from .data import DataSourceError
    from .evaluation.zeroshot import TaskDataError
    from .export import CheckpointError
    from .models import ModelLoadError
    from .plan import PlanError
    from .run_dir import RunDirError
    from .search import SearchConfigError

    expected = (
        TaskDataError,
        FileNotFoundError,
        CliError,
        PlanError,
        SearchConfigError,
        DataSourceError,
        ModelLoadError,
        CheckpointError,
        RunDirError,
        FileExistsError,
    )
    try:
        args.func(args)
    except expected as err:
        print(f"multipruner {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
