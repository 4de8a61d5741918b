"""Settings are declared once: flags, defaults, parsing and the resume check all come from the dataclass."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from multipruner.cli_options import add_settings, settings_from_args
from multipruner.search.settings import SearchSettings, parse_distribution
from multipruner.settings import differences, from_dict, result_keys, setting, to_dict


@dataclass(frozen=True)
class Example:
    ratio: float = setting(10.0, help="a ratio", aliases=("--the_ratio",))
    shares: tuple[float, float, float] | None = setting(None, help="shares", parse=parse_distribution)
    tasks: list[str] = setting(help="tasks", default_factory=lambda: ["a", "b"], affects_result=False)
    steps: int | None = setting(None, help="steps", affects_result=False)
    reorder: bool = setting(True, help="reorder")
    mode: str = setting("exact", help="mode", choices=("exact", "fast"))


def _parse(argv: list[str], prefix: str = "") -> Example:
    parser = argparse.ArgumentParser()
    add_settings(parser, Example, prefix=prefix)
    return settings_from_args(Example, parser.parse_args(argv), prefix=prefix)


def test_flags_defaults_aliases_and_types_come_from_the_fields():
    assert _parse([]) == Example()
    got = _parse(
        ["--the_ratio", "12.5", "--shares", "1:2:3", "--tasks", "x, y", "--no-reorder", "--mode", "fast"]
    )
    assert got == Example(ratio=12.5, shares=(1.0, 2.0, 3.0), tasks=["x", "y"], reorder=False, mode="fast")
    assert _parse(["--ex-ratio", "3"], prefix="ex-").ratio == 3.0  # a prefix names the group's flags


def test_bad_values_are_refused_with_the_parsers_own_message(capsys):
    with pytest.raises(SystemExit):
        _parse(["--shares", "1:2"])
    assert "pruning distribution must be three non-negative numbers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["--mode", "slow"])
    assert "invalid choice: 'slow'" in capsys.readouterr().err


def test_resume_check_compares_only_result_changing_fields():
    assert result_keys(Example) == ["ratio", "shares", "reorder", "mode"]
    stored = to_dict(Example(shares=(1.0, 2.0, 3.0)))
    assert stored["shares"] == [1.0, 2.0, 3.0] and from_dict(Example, stored) == Example(
        shares=(1.0, 2.0, 3.0)
    )
    assert differences(Example, stored, Example(shares=(1.0, 2.0, 3.0), steps=5, tasks=[])) == []
    assert differences(Example, stored, Example(ratio=20.0, shares=(1.0, 2.0, 3.0))) == [
        "ratio: 10.0 -> 20.0"
    ]


def test_every_search_setting_is_a_prune_flag():
    from multipruner.cli import build_parser

    parser = build_parser()
    prune = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("prune"))
    flags = {opt for action in prune._actions for opt in action.option_strings}
    for field in SearchSettings.__dataclass_fields__:
        assert f"--{field.replace('_', '-')}" in flags
