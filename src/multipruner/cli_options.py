"""Command-line flags generated from settings dataclasses (see ``settings.setting``).

Each field becomes ``--field-name`` (plus a prefix, e.g. ``--eval-limit``, and the field's aliases when
there is no prefix, e.g. the reference's ``--target_ratio``); booleans get ``--x / --no-x``.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from .settings import resolved_fields


def _text_parser(kind: Any):
    if typing.get_origin(kind) is list:
        return lambda text: [part.strip() for part in text.split(",") if part.strip()]
    if kind in (int, float, str):
        return kind
    raise TypeError(f"no command-line parser for {kind}; give the setting a parse= function")


def _shown(default: Any) -> str:
    if isinstance(default, tuple):
        return ":".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
    if isinstance(default, list):
        return ",".join(map(str, default))
    return str(default)


def _user_errors(parse):
    """argparse reports a ValueError as 'invalid value'; keep the parser's own message instead."""

    def wrapped(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    wrapped.__name__ = getattr(parse, "__name__", "value")
    return wrapped


def _dest(prefix: str, name: str) -> str:
    return prefix.replace("-", "_") + name


def add_settings(
    parser: argparse.ArgumentParser,
    cls,
    *,
    prefix: str = "",
    title: str | None = None,
    defaults: dict[str, Any] | None = None,
    skip: tuple[str, ...] = (),
) -> None:
    """Add one flag per field of ``cls`` (in an argument group titled ``title``)."""
    group = parser.add_argument_group(title) if title else parser
    defaults = defaults or {}
    for field, kind, _optional in resolved_fields(cls):
        meta = field.metadata
        if not meta.get("cli", True) or field.name in skip:
            continue
        flags = [f"--{prefix}{field.name.replace('_', '-')}"]
        if not prefix:
            flags += [a for a in meta.get("aliases", ()) if a not in flags]
        if field.name in defaults:
            default = defaults[field.name]
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = field.default
        help_text = meta.get("help", "")
        if "(default" not in help_text:
            help_text += f" (default: {_shown(default)})"
        help_text = help_text.replace("%", "%%")
        dest = _dest(prefix, field.name)
        if kind is bool:
            group.add_argument(
                *flags, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            group.add_argument(
                *flags,
                dest=dest,
                type=_user_errors(meta.get("parse") or _text_parser(kind)),
                default=default,
                choices=meta.get("choices"),
                help=help_text,
                metavar=None if meta.get("choices") else field.name.upper(),
            )


def settings_from_args(cls, args: argparse.Namespace, *, prefix: str = "", **fixed: Any):
    """Build ``cls`` from parsed flags (``fixed`` gives fields that are not flags)."""
    values = dict(fixed)
    for field, _kind, _optional in resolved_fields(cls):
        dest = _dest(prefix, field.name)
        if field.name not in values and hasattr(args, dest):
            values[field.name] = getattr(args, dest)
    return cls(**values)
