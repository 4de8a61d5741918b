"""The package's layers, lowest first: a module imports only from its own layer or lower ones.

    base (errors, settings, io, data, ...) < core < models < search < repair < export < evaluation
    < run.run_dir < report < run (the pipeline) < cli

``core`` (adapters, plan, surgery, extraction, checkpoints) stands alone; ``search`` knows nothing of
repair, runs or evaluation; the CLI sits on top. Checked on every import in every module, lazy ones
inside functions included.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "multipruner"

LAYERS = [
    {
        "errors",
        "settings",
        "io_utils",
        "faults",
        "tables",
        "data",
        "text_files",
        "hub_datasets",
        "shared_data",
        "timing",
        "out_of_memory",
    },
    {"core"},
    {"models", "model_sources"},
    {"search"},
    {"repair"},
    {"export"},
    {"evaluation"},
    {"run.run_dir"},  # the run directory's format: the report reads it, the pipeline writes it
    {"report"},
    {"run"},
    {"cli", "cli_options", "commands", "__init__"},
]


def layer_of(name: str) -> int:
    """The layer of a module given by its dotted path below multipruner (the most specific entry wins)."""
    parts = name.split(".")
    for prefix in (".".join(parts[:2]), parts[0]):
        for rank, names in enumerate(LAYERS):
            if prefix in names:
                return rank
    raise AssertionError(f"multipruner.{name} is in no layer: add it to LAYERS in {__file__}")


def module_name(path: Path) -> list[str]:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts


def imported_parts(path: Path) -> set[str]:
    """The modules of multipruner the imports in ``path`` reach, as dotted paths below multipruner
    (two levels at most: enough to place them in a layer)."""
    package = list(path.parent.relative_to(PACKAGE).parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
                if len(target) < 2:  # ``from . import x`` / ``from .pkg import x``: x may be a module
                    found.update(".".join([*target, alias.name])[:] for alias in node.names)
                    continue
                found.add(".".join(target[:2]))
            elif node.module and node.module.startswith("multipruner."):
                found.add(".".join(node.module.split(".")[1:3]))
        elif isinstance(node, ast.Import):
            found.update(
                ".".join(a.name.split(".")[1:3]) for a in node.names if a.name.startswith("multipruner.")
            )
    return found


def test_every_module_imports_only_its_own_layer_or_lower():
    modules = [p for p in PACKAGE.rglob("*.py") if "modeling" not in p.parts]
    assert len(modules) > 30  # the check ran on the tree
    violations = []
    for path in modules:
        own = ".".join(module_name(path)[:2])
        for name in imported_parts(path):
            if layer_of(name) > layer_of(own):
                violations.append(f"{path.relative_to(PACKAGE)} imports multipruner.{name}")
    assert violations == []


def test_pruned_model_code_imports_nothing_from_the_package():
    """modeling_multipruner.py is copied next to every saved model and must load without multipruner."""
    code = (PACKAGE / "core" / "modeling" / "modeling_multipruner.py").read_text()
    assert "multipruner" not in imported_parts(PACKAGE / "core" / "modeling" / "modeling_multipruner.py")
    assert "from ." not in code and "import multipruner" not in code


def test_layer_rule_catches_an_upward_import(tmp_path):
    """The checker itself: a core module importing the search is found."""
    fake = PACKAGE / "core" / "_boundary_probe.py"
    fake.write_text("from ..search.loop import run_search\n")
    try:
        parts = imported_parts(fake)
    finally:
        fake.unlink()
    assert parts == {"search.loop"} and layer_of("search.loop") > layer_of("core.extract")


def test_core_and_search_load_no_evaluation_report_or_cli():
    """At run time too: importing the core and the search pulls in no evaluation, report or CLI code,
    nor lm-eval or matplotlib (both slow to import and not needed to prune)."""
    code = (
        "import sys\n"
        "import multipruner.core.extract, multipruner.core.checkpoint, multipruner.search.loop\n"
        "import multipruner.search.shortgpt, multipruner.search.calibration\n"
        "print('\\n'.join(sorted(sys.modules)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    forbidden = [
        m
        for m in loaded
        if m.startswith(
            (
                "multipruner.evaluation",
                "multipruner.report",
                "multipruner.cli",
                "multipruner.run",
                "multipruner.repair",
                "lm_eval",
                "matplotlib",
            )
        )
    ]
    assert forbidden == []
    assert "multipruner.search.scoring" in loaded  # the check ran on what it meant to
