"""Command-line interface: `multipruner prune | extract | compensate | recover | inspect | eval | bench | export | report`.

Flags come from the settings dataclasses (``cli_options``); ``prune`` also accepts the reference's flag
spellings, so the authors' published commands run with only the program name changed.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys

from .commands.measure import add_bench, add_eval, add_inspect
from .commands.produce import add_compensate, add_extract, add_recover
from .commands.prune import add_prune
from .commands.publish import add_export, add_report
from .errors import UsageError

log = logging.getLogger("multipruner")


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
