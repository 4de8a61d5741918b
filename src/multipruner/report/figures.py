"""The report's three figures, each a pure function of typed run data.

Every function returns a matplotlib ``Figure`` on its own Agg canvas (no pyplot global state, no
display), so figures can be drawn in tests and in threads and reused outside a report.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

from ..core.layout import ModelLayout
from ..core.plan import PruningPlan
from ..evaluation.results import EvalResult
from ..run.run_dir import DenseRecord
from ..search.loop import StepRecord
from .run_data import (
    STAGE_ORDER,
    accuracy_tasks,
    comparison_metric,
    metric_of,
    shared_accuracy_tasks,
    task_label,
)

log = logging.getLogger(__name__)

SPEED_RATIO_LABELS = {
    "prefill_speedup": "prefill\nspeed-up",
    "decode_speedup": "decode\nspeed-up",
    "memory_ratio": "peak memory\nratio",
    "params_ratio": "params\nratio",
    "disk_ratio": "disk size\nratio",
}
COLOR_FULL, COLOR_SHRUNK, COLOR_REMOVED = "#2e7d32", "#aed581", "#d32f2f"
COLOR_DENSE, COLOR_PRUNED = "#607d8b", "#ef6c00"
DPI = 120


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _plain_number(value: float, _pos: int | None = None) -> str:
    """Tick label ``25`` instead of ``2.5 x 10^1``: perplexities are read as plain numbers."""
    return f"{value:.3g}"


def stage_colors(stages: Sequence[str]) -> dict[str, str]:
    """Stable colours: the search's stages always get the same one, unknown stages follow."""
    fixed = {s: f"C{i}" for i, s in enumerate(STAGE_ORDER)}
    ordered = [s for s in STAGE_ORDER if s in stages] + sorted(s for s in set(stages) if s not in fixed)
    extra = iter(f"C{i}" for i in range(len(STAGE_ORDER), 10))
    return {s: fixed.get(s) or next(extra, "C9") for s in ordered}


# --- search trajectory -----------------------------------------------------------------------------
def plot_trajectory(
    steps: Sequence[StepRecord], dense: DenseRecord | None, score_name: str = "calibration perplexity"
) -> Figure:
    """Calibration perplexity (log scale) of each step's choice against the pruning ratio, per stage.

    The width stages score on their own calibration set, so the curve jumps where they start; a dotted
    line marks that point and a hollow star the dense model's perplexity on the width set.
    """
    points = [
        (s.ratio, s.ppl, s.stage)
        for s in sorted(steps, key=lambda s: s.step)
        if s.ppl is not None and math.isfinite(s.ppl) and s.ppl > 0
    ]
    dense_ppl = dense.ppl if dense is not None else None
    fig = new_figure(8, 5)
    ax = fig.add_subplot()
    path = ([(0.0, dense_ppl)] if dense_ppl else []) + [(r, p) for r, p, _ in points]
    if path:
        ax.plot(*zip(*path, strict=True), color="0.7", lw=1, zorder=1)
    for stage, color in stage_colors([stage for _, _, stage in points]).items():
        xs = [r for r, _, s in points if s == stage]
        ys = [p for _, p, s in points if s == stage]
        ax.scatter(xs, ys, color=color, s=22, zorder=2, label=f"{stage} ({len(xs)} steps)")

    def dense_star(ppl: float, label: str, filled: bool) -> None:
        fill = {"color": "black"} if filled else {"facecolors": "none", "edgecolors": "black"}
        ax.scatter([0.0], [ppl], marker="*", s=180, zorder=3, label=label, **fill)

    if dense_ppl:
        dense_star(dense_ppl, f"dense (ppl {dense_ppl:.2f})", filled=True)
    block_ratios = [r for r, _, stage in points if stage == "block"]
    width_ppl = dense.ppl_width if dense is not None else None
    if width_ppl and block_ratios and len(block_ratios) < len(points):
        ax.axvline(max(block_ratios), color="0.5", ls=":", lw=1, zorder=0)
        dense_star(width_ppl, f"dense, width set (ppl {width_ppl:.2f}): used from the dotted line on", False)
    if points:
        r, p, _ = points[-1]
        ax.annotate(
            f"final: {p:.2f} @ {r:.1f}%",
            (r, p),
            textcoords="offset points",
            xytext=(-8, 0),
            ha="right",
            va="center",
        )
    if path:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(_plain_number))
        ax.yaxis.set_minor_formatter(FuncFormatter(_plain_number))
        ax.margins(y=0.08)
    else:
        ax.text(0.5, 0.5, "no steps recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("pruning ratio (% of dense parameters removed)")
    ax.set_ylabel(f"{score_name} (log scale)")
    ax.set_title("Search trajectory: perplexity of the chosen candidate at each step")
    ax.grid(True, which="both", alpha=0.3)
    if points or dense_ppl:
        ax.legend(loc="upper left")
    return fig


# --- layer structure -------------------------------------------------------------------------------
def _cell_states(plan: PruningPlan, layout: ModelLayout) -> list[list[int]]:
    """0 removed, 1 narrowed, 2 full -- per layer; rows attention then MLP."""
    return [
        [0 if i in plan.removed(kind) else 2 if w >= full else 1 for i, w in enumerate(plan.width(kind))]
        for kind, full in (("attention", layout.attention_width), ("mlp", layout.mlp_width))
    ]


def _kept_bars(ax, values: Sequence[float], removed: frozenset[int], top: float) -> None:
    """Bars of what is kept, coloured like the cells above; a removed block gets a red cross instead."""
    xs = range(len(values))
    heights = [0.0 if i in removed else v for i, v in zip(xs, values, strict=True)]
    colors = [COLOR_FULL if h >= top else COLOR_SHRUNK for h in heights]
    ax.bar(xs, heights, color=colors, edgecolor=COLOR_FULL, width=0.8)
    gone = sorted(removed)
    if gone:
        ax.scatter(gone, [top * 0.04] * len(gone), marker="x", color=COLOR_REMOVED, s=40, zorder=3)
    ax.axhline(top, color="0.4", ls="--", lw=1)
    ax.set_ylim(0, top * 1.08)
    ax.grid(True, axis="y", alpha=0.3)


def plot_structure(plan: PruningPlan, layout: ModelLayout, ratio: float | None = None) -> Figure:
    """Per layer: which blocks remain, how much MLP width and how many query heads each kept."""
    n = plan.num_layers
    fig = new_figure(max(8.0, 3.0 + 0.28 * n), 7.5)
    grid, mlp_ax, attn_ax = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [1.0, 1.4, 1.4]})
    grid.imshow(
        _cell_states(plan, layout),
        cmap=ListedColormap([COLOR_REMOVED, COLOR_SHRUNK, COLOR_FULL]),
        vmin=0,
        vmax=2,
        aspect="auto",
        extent=(-0.5, n - 0.5, 1.5, -0.5),
        interpolation="nearest",
    )
    grid.set_yticks([0, 1], ["attention", "MLP"])
    grid.set_xticks([i + 0.5 for i in range(n - 1)], minor=True)
    grid.set_yticks([0.5], minor=True)
    grid.grid(True, which="minor", color="white", lw=2)
    grid.tick_params(which="minor", length=0)
    grid.legend(
        handles=[
            Patch(color=COLOR_FULL, label="kept (full width)"),
            Patch(color=COLOR_SHRUNK, label="kept (narrowed)"),
            Patch(color=COLOR_REMOVED, label="removed"),
        ],
        loc="lower center",
        bbox_to_anchor=(0.5, 1.02),
        ncol=3,
        frameon=False,
    )
    _kept_bars(mlp_ax, [w / layout.mlp_width for w in plan.mlp_width], plan.removed_mlp, 1.0)
    mlp_ax.set_ylabel(f"MLP width kept\n(fraction of {layout.mlp_width})")
    heads = [w / layout.head_dim for w in plan.attention_width]
    _kept_bars(attn_ax, heads, plan.removed_attention, float(layout.num_heads))
    attn_ax.set_ylabel(f"query heads kept\n(of {layout.num_heads})")
    attn_ax.set_xticks(range(0, n, max(1, math.ceil(n / 40))))
    attn_ax.set_xlim(-0.5, n - 0.5)
    attn_ax.set_xlabel("layer  (red × = block removed)")
    title = (
        f"Pruned structure: {len(plan.removed_attention)} of {n} attention and "
        f"{len(plan.removed_mlp)} of {n} MLP blocks removed"
    )
    if ratio is not None:
        title += f"; {ratio:.1f}% of parameters pruned"
    fig.suptitle(title)
    return fig


# --- dense vs pruned -------------------------------------------------------------------------------
def plot_comparison(
    eval_dense: EvalResult | None,
    eval_pruned: EvalResult | None,
    speed_ratios: Mapping[str, float | None] | None,
) -> Figure | None:
    """Grouped accuracy bars (headline metric, %) and a panel of speed/size ratios; None without data."""
    tasks = accuracy_tasks(eval_dense, eval_pruned)
    ratios = {k: v for k, v in (speed_ratios or {}).items() if k in SPEED_RATIO_LABELS and v is not None}
    panels = int(bool(tasks)) + int(bool(ratios))
    if not panels:
        return None
    groups = len(tasks) + (len(shared_accuracy_tasks(eval_dense, eval_pruned)) > 1)
    fig = new_figure(max(7.0, (2.0 + 0.9 * groups if tasks else 0.0) + (5.0 if ratios else 0.0)), 4.8)
    width_ratios = [w for w, used in ((max(groups, 3), tasks), (3, ratios)) if used]
    axes = list(fig.subplots(1, panels, width_ratios=width_ratios, squeeze=False)[0])
    if tasks:
        _accuracy_panel(axes.pop(0), tasks, eval_dense, eval_pruned)
    if ratios:
        _ratio_panel(axes.pop(0), ratios)
    fig.suptitle("Dense vs pruned model")
    return fig


def _accuracy_panel(ax, tasks: list[str], dense: EvalResult | None, pruned: EvalResult | None) -> None:
    """One bar pair per task, then the mean over the tasks both models ran; error bars are one stderr."""
    labels = [task_label(t) for t in tasks]
    shared = shared_accuracy_tasks(dense, pruned)
    columns: dict[str, list[tuple[float, float] | None]] = {"dense": [], "pruned": []}
    for name, result in (("dense", dense), ("pruned", pruned)):
        for task in tasks:
            m = metric_of(result, task, comparison_metric(task, dense, pruned))
            columns[name].append(None if m is None else (100 * m.value, 100 * (m.stderr or 0.0)))
        if len(shared) > 1:
            mean = result.mean_accuracy(shared) if result is not None else None
            columns[name].append(None if mean is None else (100 * mean[0], 100 * (mean[1] or 0.0)))
    if len(shared) > 1:
        labels.append(f"mean of {len(shared)}")
    xs = range(len(labels))
    for offset, name, color in ((-0.2, "dense", COLOR_DENSE), (0.2, "pruned", COLOR_PRUNED)):
        values = columns[name]
        bars = ax.bar(
            [x + offset for x in xs],
            [v[0] if v else 0.0 for v in values],
            yerr=[v[1] if v else 0.0 for v in values],
            width=0.4,
            color=color,
            label=name,
            error_kw={"lw": 0.8, "capsize": 2},
        )
        ax.bar_label(bars, labels=[f"{v[0]:.1f}" if v else "—" for v in values], fontsize=7, padding=1)
    rotate = len(labels) > 5
    ax.set_xticks(list(xs), labels, rotation=30 if rotate else 0, ha="right" if rotate else "center")
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Task accuracy")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper right")


def _ratio_panel(ax, ratios: Mapping[str, float]) -> None:
    keys = [k for k in SPEED_RATIO_LABELS if k in ratios]
    values = [ratios[k] for k in keys]
    colors = [
        COLOR_FULL if (v >= 1) == k.endswith("speedup") else COLOR_REMOVED
        for k, v in zip(keys, values, strict=True)
    ]
    bars = ax.bar(range(len(keys)), values, color=colors, width=0.6)
    ax.bar_label(bars, labels=[f"{v:.2f}×" for v in values], fontsize=8, padding=1)
    ax.axhline(1.0, color="black", ls="--", lw=1, label="dense = 1")
    ax.set_xticks(range(len(keys)), [SPEED_RATIO_LABELS[k] for k in keys], fontsize=8)
    ax.set_ylabel("pruned / dense")
    ax.set_ylim(0, max([1.0, *values]) * 1.18)
    ax.set_title("Speed and size (green = better)")
    ax.legend(loc="upper right")
    ax.grid(True, axis="y", alpha=0.3)
