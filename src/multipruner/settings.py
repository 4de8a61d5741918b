"""Settings dataclasses, declared once: each field carries its help text, its command-line spellings and
whether it changes a run's result (then a resumed run must keep it).

The CLI generates its flags from these fields and the run directory derives its resume check from them,
so a new setting is one field in one dataclass.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,  # noqa: A002 - the argparse word
    aliases: tuple[str, ...] = (),
    affects_result: bool = True,
    parse: Callable[[str], Any] | None = None,
    choices: tuple | None = None,
    default_factory: Callable[[], Any] | None = None,
    cli: bool = True,
    until_recorded: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with the metadata the CLI and the run directory need.

    ``aliases``: extra flag spellings (the reference's, e.g. ``--target_ratio``); the primary flag is the
    field name with dashes. ``affects_result``: part of the resume check. ``parse``: how to read the
    flag's text (default: from the type). ``cli=False``: not a flag (set by code). ``until_recorded``:
    the behaviour of runs whose stored settings predate the field, when it is not today's default.
    """
    metadata = {
        "help": help,
        "aliases": aliases,
        "affects_result": affects_result,
        "parse": parse,
        "choices": choices,
        "cli": cli,
        "until_recorded": until_recorded,
    }
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def base_type(annotation: Any) -> tuple[Any, bool]:
    """``(type, optional)`` of a field annotation such as ``int | None`` or ``list[str]``."""
    if isinstance(annotation, str):
        raise TypeError("settings dataclasses must not use string annotations")
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return inner[0], len(inner) < len(args)
    return annotation, False


def resolved_fields(cls) -> list[tuple[dataclasses.Field, Any, bool]]:
    """Fields with their resolved annotations: ``(field, type, optional)``."""
    hints = typing.get_type_hints(cls)
    return [(f, *base_type(hints[f.name])) for f in dataclasses.fields(cls)]


def to_dict(settings) -> dict:
    """JSON-ready values (tuples become lists)."""
    return json_ready(dataclasses.asdict(settings))


def json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


def unrecorded_values(cls) -> dict:
    """What a stored run that lacks a field did: ``until_recorded`` where a field has one."""
    return {
        f.name: f.metadata["until_recorded"]
        for f in dataclasses.fields(cls)
        if f.metadata.get("until_recorded", dataclasses.MISSING) is not dataclasses.MISSING
    }


def from_dict(cls, data: dict):
    """Rebuild settings from ``to_dict`` output (unknown keys ignored; missing ones take what runs did
    before the field existed, see ``unrecorded_values``, else the default)."""
    data = {**unrecorded_values(cls), **data}
    values = {}
    for f, kind, _ in resolved_fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        if typing.get_origin(kind) is tuple and isinstance(value, list):
            value = tuple(value)
        values[f.name] = value
    return cls(**values)


def result_keys(cls) -> list[str]:
    """Names of the fields that change a run's result (the resume check)."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("affects_result", True)]


def differences(cls, stored: dict, current) -> list[str]:
    """``name: old -> new`` for each result-changing field that differs between a stored and a new run."""
    now = to_dict(current)
    return [
        f"{key}: {stored.get(key)!r} -> {now.get(key)!r}"
        for key in result_keys(cls)
        if json_ready(stored.get(key)) != now.get(key)
    ]
