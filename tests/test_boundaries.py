"""The core (plan, surgery, scoring, search) stands alone: it imports nothing from evaluation, report or CLI."""

from __future__ import annotations

import subprocess
import sys

CORE = [
    "plan",
    "surgery",
    "scoring",
    "search",
    "racing",
    "shortgpt",
    "layout",
    "reorder",
    "export",
    "calibration",
]


def test_core_imports_no_evaluation_report_or_cli():
    code = (
        "import sys\n"
        + "".join(f"import multipruner.{name}\n" for name in CORE)
        + "print('\\n'.join(sorted(sys.modules)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    forbidden = [
        m
        for m in loaded
        if m.startswith(
            ("multipruner.evaluation", "multipruner.report", "multipruner.cli", "lm_eval", "matplotlib")
        )
    ]
    assert forbidden == []
    assert "multipruner.search" in loaded  # the check ran on what it meant to
