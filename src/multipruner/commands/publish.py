"""The commands that turn finished work into files for elsewhere: ``export`` (a GGUF for llama.cpp) and
``report`` (a run directory's report.md and figures)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..cli_options import add_settings, settings_from_args


def add_export(sub) -> None:
    from ..export.gguf import GGUFExportSettings
    from ..models import ModelSettings

    p = sub.add_parser(
        "export", help="write a dense or pruned model as GGUF for llama.cpp (deci architecture)"
    )
    add_settings(p, ModelSettings)
    p.add_argument("--format", choices=("gguf",), default="gguf", help="output format (default: gguf)")
    add_settings(p, GGUFExportSettings)
    p.add_argument("--output", required=True, help="the .gguf file to write")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> None:
    from ..export.gguf import (
        GGUFExportSettings,
        check_output_file,
        display_name,
        export_gguf,
        vocabulary_gguf,
    )
    from ..models import ModelSettings

    settings = settings_from_args(GGUFExportSettings, args)
    output = Path(args.output)
    check_output_file(output, settings.overwrite)
    model_settings = replace(settings_from_args(ModelSettings, args), dtype="float32", device="cpu")
    model_settings.check(tokenizer=False)
    vocab = vocabulary_gguf(args.model)
    if vocab is None:  # the vocabulary comes from the model's own tokenizer then
        model_settings.check(tokenizer=True)
    model, tokenizer = model_settings.load()
    path = export_gguf(
        model,
        output,
        outtype=settings.outtype,
        overwrite=settings.overwrite,
        tokenizer=tokenizer,
        tokenizer_dir=Path(args.model) if Path(args.model).is_dir() else None,
        tokenizer_gguf=vocab,
        name=display_name(args.model),
    )
    size = path.stat().st_size / 2**20
    print(f"wrote {path} ({size:.1f} MiB, {settings.outtype}, vocabulary from {vocab or args.model})")


def add_report(sub) -> None:
    p = sub.add_parser("report", help="report.md and figures for a run directory")
    p.add_argument("run_dir")
    p.add_argument("--out-dir", default=None)
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> None:
    from ..report import write_report

    print(write_report(args.run_dir, args.out_dir))
