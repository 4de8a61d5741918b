"""``multipruner report RUN_DIR``: one Markdown page with figures that explains a pruning run.

The package is split by concern: ``run_data`` reads a run through the run directory's typed readers,
``figures`` draws from typed data, ``markdown`` renders the page. ``write_report`` ties them together
and writes every file atomically, so a reader never sees half a PNG or half a report.
"""

from __future__ import annotations

import logging
from pathlib import Path

from matplotlib.figure import Figure

from ..io_utils import atomic_write_bytes
from .figures import plot_comparison, plot_structure, plot_trajectory, png_bytes
from .markdown import render_markdown
from .run_data import RunData, load_run

__all__ = ["RunData", "load_run", "write_report"]

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"
TRAJECTORY_PNG = "trajectory.png"
STRUCTURE_PNG = "structure.png"
COMPARISON_PNG = "comparison.png"


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write report.md and its PNGs into ``out_dir`` (default: the run directory); return the report path."""
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.run_dir
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, str] = {}

    def emit(fig: Figure | None, name: str, caption: str) -> None:
        if fig is not None:
            atomic_write_bytes(out / name, png_bytes(fig))
            figures[name] = caption

    if run.steps or run.dense is not None:
        emit(
            plot_trajectory(run.steps, run.dense, run.score_label),
            TRAJECTORY_PNG,
            f"{run.score_label[:1].upper() + run.score_label[1:]} vs pruning ratio",
        )
    if run.plan is not None and run.layout is not None:
        emit(
            plot_structure(run.plan, run.layout, run.final_ratio),
            STRUCTURE_PNG,
            "Layer structure after pruning",
        )
    else:
        log.info("no structure figure: the run has no plan with its model layout")
    ratios = run.bench.get("ratios") if run.bench else None
    emit(
        plot_comparison(run.eval_dense, run.eval_pruned, ratios),
        COMPARISON_PNG,
        "Dense vs pruned: accuracy and speed",
    )
    report = out / REPORT_FILE
    atomic_write_bytes(report, render_markdown(run, figures).encode())  # UTF-8 whatever the locale
    log.info("wrote %s (%d figures)", report, len(figures))
    return report
