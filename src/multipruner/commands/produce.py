"""The commands that write a model: ``extract`` (apply a plan), ``compensate`` (apply it and refit the
narrowed branches in closed form) and ``recover`` (LoRA fine-tuning of a pruned model)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..cli_options import add_settings, settings_from_args
from . import CliError
from .plan_flags import add_plan_flags, plan_request


def add_extract(sub) -> None:
    from ..models import ModelSettings
    from ..search.calibration import CalibrationSettings

    p = sub.add_parser(
        "extract", help="apply a plan (ours or the reference's pruning_config.json) and save a smaller model"
    )
    add_settings(p, ModelSettings)
    p.add_argument("--plan", required=True)
    p.add_argument("--output", "--output_path", dest="output", required=True)
    add_plan_flags(p)
    p.add_argument("--overwrite", action="store_true")
    add_settings(p, CalibrationSettings, title="calibration text (only read with --activation-order)")
    p.set_defaults(func=cmd_extract)


def cmd_extract(args) -> None:
    from ..core.checkpoint import save_pruned
    from ..core.extract import extract
    from ..core.inspect_model import format_layer_table
    from ..core.surgery import PrunableModel
    from ..io_utils import check_output
    from ..models import ModelSettings
    from ..run.planned_model import load_dense_with_plan

    check_output(args.output, directory=True, overwrite=args.overwrite)
    request = plan_request(args, activation_order=args.activation_order)
    model = settings_from_args(ModelSettings, args)
    model.check(dense=True)
    planned = load_dense_with_plan(model, request)
    plan, layout = planned.plan, planned.layout
    pruned = extract(PrunableModel.from_plan(planned.model, plan), plan)
    save_pruned(pruned, planned.tokenizer, args.output, plan, layout, overwrite=args.overwrite)
    print(format_layer_table(pruned))
    print(
        f"pruning ratio {plan.ratio(layout):.2f}% ({layout.dense_params():,} -> {plan.num_params(layout):,}); "
        f"saved to {args.output}"
    )


def add_compensate(sub) -> None:
    from ..models import ModelSettings
    from ..repair.compensate import CompensateSettings
    from ..search.calibration import CalibrationSettings

    p = sub.add_parser(
        "compensate",
        help="extract a plan and refit its narrowed branches in closed form (no training); save the model",
    )
    add_settings(p, ModelSettings)
    p.add_argument("--plan", required=True, help="our plan.json or the reference's pruning_config.json")
    p.add_argument("--output", "--output_path", dest="output", required=True)
    add_plan_flags(p)
    p.add_argument("--overwrite", action="store_true")
    add_settings(p, CompensateSettings, title="compensation")
    add_settings(
        p, CalibrationSettings, title="calibration text (its token budgets size the default compensation set)"
    )
    p.set_defaults(func=cmd_compensate)


def cmd_compensate(args) -> None:
    from ..core.checkpoint import save_pruned
    from ..core.extract import extract
    from ..core.surgery import PrunableModel
    from ..io_utils import check_output
    from ..models import ModelSettings
    from ..repair.compensate import CompensateSettings, compensate, compensation_summary
    from ..report.summary import compensation_table
    from ..run.planned_model import load_dense_with_plan
    from ..search.calibration import CalibrationSettings

    settings = settings_from_args(CompensateSettings, args)
    settings.validate()
    calibration = settings_from_args(CalibrationSettings, args)
    calibration.validate()
    check_output(args.output, directory=True, overwrite=args.overwrite)
    request = plan_request(args, activation_order=args.activation_order)
    if not args.activation_order:  # checked with the request otherwise
        calibration.check_source()  # the compensation tokens are drawn from it
    model = settings_from_args(ModelSettings, args)
    model.check(dense=True)
    planned = load_dense_with_plan(model, request)
    prunable = PrunableModel.from_plan(planned.model, planned.plan)
    tokens = settings.calibration_tokens(calibration, None, planned.tokenizer)
    pruned = extract(prunable, planned.plan)
    fits = compensate(prunable, pruned, planned.plan, tokens, settings, batch_size=calibration.batch_size)
    plan = replace(
        planned.plan, meta={**planned.plan.meta, "compensation": compensation_summary(fits, settings, tokens)}
    )
    save_pruned(pruned, planned.tokenizer, args.output, plan, planned.layout, overwrite=args.overwrite)
    print(compensation_table(fits))
    print(f"compensated {len(fits)} branches on {tokens.numel()} tokens; saved to {args.output}")


def add_recover(sub) -> None:
    from ..models import ModelSettings
    from ..repair.recover import RecoverSettings

    p = sub.add_parser("recover", help="LoRA recovery fine-tuning of a pruned model, merged into its weights")
    add_settings(p, ModelSettings, skip=("model",))
    p.add_argument("--model", "--model_path", dest="model", required=True, help="a pruned model directory")
    p.add_argument("--output", required=True, help="where the recovered (merged) model goes")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--overwrite", action="store_true")
    add_settings(p, RecoverSettings, title="recovery")
    p.set_defaults(func=cmd_recover)


def cmd_recover(args) -> None:
    from ..io_utils import check_output
    from ..model_sources import is_pruned_dir
    from ..models import ModelSettings
    from ..repair.recover import RecoverSettings, recover
    from ..search.calibration import check_source

    settings = settings_from_args(RecoverSettings, args)
    settings.validate()
    check_output(args.output, directory=True, overwrite=args.overwrite)
    model = settings_from_args(ModelSettings, args, model=args.model)
    if Path(args.model).exists() and not (Path(args.model).is_dir() and is_pruned_dir(Path(args.model))):
        raise CliError(
            f"{args.model} is not a pruned model directory (prune --extract or extract writes one)"
        )
    model.check()  # and its tokenizer: recovery cuts its training text with it
    check_source(settings.data)
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
