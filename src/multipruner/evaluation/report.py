"""``multipruner report RUN_DIR``: one Markdown page with figures that explains a pruning run.

A run directory collects what the other commands wrote (every file but one of ``steps.jsonl`` /
``plan.json`` is optional, and whatever is absent is left out of the report):

* ``steps.jsonl`` -- one search step per line; an optional first record with ``"step": -1`` /
  ``"stage": "dense"`` carries the dense calibration perplexity. A torn last line (a killed run)
  is skipped. ``elapsed_s`` is the duration of one step, so the search wall time is their sum.
* ``plan.json`` -- the final plan in multipruner's format, ideally with ``layout`` and ``params``.
* ``eval_dense.json`` / ``eval_pruned.json`` -- WikiText-2 perplexity and zero-shot accuracies (%).
* ``bench.json`` -- ``speed.compare_speed`` output.

The ``plot_*`` functions take plain data and return a matplotlib ``Figure`` (Agg canvas, no pyplot
global state), so they can be tested and reused without a run directory. Every file is written
atomically: a reader never sees half a PNG or half a report.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

from ..io_utils import atomic_write_bytes
from .zeroshot import headline_metric

logger = logging.getLogger(__name__)

STEPS_FILE = "steps.jsonl"
PLAN_FILE = "plan.json"
EVAL_DENSE_FILE = "eval_dense.json"
EVAL_PRUNED_FILE = "eval_pruned.json"
BENCH_FILE = "bench.json"
REPORT_FILE = "report.md"
TRAJECTORY_PNG = "trajectory.png"
STRUCTURE_PNG = "structure.png"
COMPARISON_PNG = "comparison.png"

STAGE_ORDER = ("block", "mlp_width", "attn_width")
TASK_LABELS = {
    "piqa": "PIQA",
    "winogrande": "WinoGrande",
    "hellaswag": "HellaSwag",
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
    "boolq": "BoolQ",
    "openbookqa": "OpenBookQA",
}
AVG_KEY = "5cs_acc_avg"
# Numeric keys of an eval file that are not task accuracies.
NON_TASK_KEYS = frozenset({"total_params", "pruned_model_params", "ratio", "ppl_wikitext2", AVG_KEY})
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


# =========================================================================== reading
@dataclass(frozen=True)
class RunData:
    """Everything a report can show; absent files are None (or an empty step list)."""

    run_dir: Path
    steps: list[dict]  # search steps (step >= 0), in file order
    dense_step: dict | None  # the optional step -1 record
    plan: dict | None
    eval_dense: dict | None
    eval_pruned: dict | None
    bench: dict | None

    @property
    def layout(self) -> dict | None:
        return (self.plan or {}).get("layout")

    @property
    def dense_ppl(self) -> float | None:
        return _num((self.dense_step or {}).get("ppl"))

    @property
    def dense_width_ppl(self) -> float | None:
        """The dense model's perplexity on the width-stage calibration set, when the run recorded it."""
        return _num((self.dense_step or {}).get("ppl_width"))


def read_steps(path: str | Path) -> list[dict]:
    """Every JSON object line of a steps file; lines that do not parse (a torn last line) are skipped."""
    records = []
    lines = Path(path).read_text(errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            level = logging.INFO if n == len(lines) else logging.WARNING
            logger.log(level, "%s line %d is not complete JSON; skipped", path, n)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _read_json(path: Path) -> dict | None:
    """An optional JSON file: None when absent or unreadable (a report should not die on a side file)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        logger.warning("ignoring unreadable %s: %s", path, err)
        return None
    return data if isinstance(data, dict) else None


def _is_dense_record(record: Mapping) -> bool:
    return record.get("step") == -1 or record.get("stage") == "dense"


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory; it must exist and hold ``steps.jsonl`` or ``plan.json``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist (or is not a directory)")
    steps_path, plan_path = run_dir / STEPS_FILE, run_dir / PLAN_FILE
    if not steps_path.is_file() and not plan_path.is_file():
        raise FileNotFoundError(
            f"run directory {run_dir} has neither {STEPS_FILE} nor {PLAN_FILE}: nothing to report"
        )
    records = read_steps(steps_path) if steps_path.is_file() else []
    dense = next((r for r in records if _is_dense_record(r)), None)
    return RunData(
        run_dir=run_dir,
        steps=[r for r in records if not _is_dense_record(r)],
        dense_step=dense,
        plan=_read_json(plan_path),
        eval_dense=_read_json(run_dir / EVAL_DENSE_FILE),
        eval_pruned=_read_json(run_dir / EVAL_PRUNED_FILE),
        bench=_read_json(run_dir / BENCH_FILE),
    )


# =========================================================================== small helpers
def _num(value: Any) -> float | None:
    """A finite number or None (JSON null, strings, NaN and bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den == 0 else num / den


def _fmt_params(n: float | None) -> str:
    if n is None:
        return "—"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "—" if value is None else f"{format(value, spec)}{suffix}"


def _fmt_times(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}×"


def _fmt_points(dense: float | None, pruned: float | None) -> str:
    if dense is None or pruned is None:
        return "—"
    return f"{pruned - dense:+.2f} pt"


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s" if m else f"{seconds:.1f}s"


def _plain_number(value: float, _pos: int | None = None) -> str:
    """Tick label ``25`` instead of ``2.5 x 10^1``: perplexities are read as plain numbers."""
    return f"{value:.3g}"


def _stage_colors(stages: Sequence[str]) -> dict[str, str]:
    """Stable colours: the known stages always get the same one, others follow."""
    ordered = [s for s in STAGE_ORDER if s in stages] + sorted(s for s in set(stages) if s not in STAGE_ORDER)
    fixed = {s: f"C{i}" for i, s in enumerate(STAGE_ORDER)}
    extra = iter(f"C{i}" for i in range(len(STAGE_ORDER), 10))
    return {s: fixed.get(s) or next(extra, "C9") for s in ordered}


def _new_figure(width: float, height: float) -> Figure:
    """A figure on an Agg canvas, independent of pyplot (no global state, no display needed)."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def save_figure(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    atomic_write_bytes(path, figure_png_bytes(fig))
    return path


# =========================================================================== structure
@dataclass(frozen=True)
class LayerStructure:
    """What is left of each layer: enough to draw the structure figure.

    ``attention_width`` counts query channels (kept heads x head_dim); widths of removed blocks are
    ignored. ``head_dim`` / ``num_heads`` are None when the run has no layout (then head bars show
    the kept fraction of query channels).
    """

    removed_attention: frozenset[int]
    removed_mlp: frozenset[int]
    attention_width: tuple[int, ...]
    mlp_width: tuple[int, ...]
    full_attention_width: int
    full_mlp_width: int
    head_dim: int | None = None
    num_heads: int | None = None

    @property
    def num_layers(self) -> int:
        return len(self.mlp_width)

    @classmethod
    def from_plan(cls, plan: Mapping, layout: Mapping | None = None) -> LayerStructure:
        """From a ``plan.json`` dict (its own ``layout`` is used when ``layout`` is not given)."""
        layout = layout or plan.get("layout") or {}
        attn = tuple(int(w) for w in plan["attention_width"])
        mlp = tuple(int(w) for w in plan["mlp_width"])
        head_dim, num_heads = layout.get("head_dim"), layout.get("num_heads")
        full_attn = head_dim * num_heads if head_dim and num_heads else max(attn, default=1)
        return cls(
            removed_attention=frozenset(int(i) for i in plan.get("removed_attention", ())),
            removed_mlp=frozenset(int(i) for i in plan.get("removed_mlp", ())),
            attention_width=attn,
            mlp_width=mlp,
            full_attention_width=int(full_attn),
            full_mlp_width=int(layout.get("mlp_width") or max(mlp, default=1)),
            head_dim=head_dim,
            num_heads=num_heads,
        )

    @classmethod
    def from_reference(
        cls,
        ref: Mapping,
        *,
        full_attention_width: int | None = None,
        full_mlp_width: int | None = None,
        head_dim: int | None = None,
        num_heads: int | None = None,
    ) -> LayerStructure:
        """From the reference-format plan a step record carries (``pruned_attn_idx`` etc.).

        Without the full widths the widest layer stands in; that is exact whenever some layer is
        still unshrunk, which is the usual case.
        """
        attn_w = {int(k): int(v) for k, v in (ref.get("pruned_attn_width") or {}).items()}
        mlp_w = {int(k): int(v) for k, v in (ref.get("pruned_mlp_width") or {}).items()}
        removed_attn = frozenset(int(i) for i in ref.get("pruned_attn_idx", ()))
        removed_mlp = frozenset(int(i) for i in ref.get("pruned_mlp_idx", ()))
        n = 1 + max([*attn_w, *mlp_w, *removed_attn, *removed_mlp], default=-1)
        full_attn = full_attention_width or max(attn_w.values(), default=1)
        full_mlp = full_mlp_width or max(mlp_w.values(), default=1)
        return cls(
            removed_attention=removed_attn,
            removed_mlp=removed_mlp,
            attention_width=tuple(attn_w.get(i, full_attn) for i in range(n)),
            mlp_width=tuple(mlp_w.get(i, full_mlp) for i in range(n)),
            full_attention_width=int(full_attn),
            full_mlp_width=int(full_mlp),
            head_dim=head_dim,
            num_heads=num_heads,
        )


def structure_of_run(run: RunData) -> LayerStructure | None:
    """The final structure: ``plan.json`` if usable, else the last step's plan."""
    if run.plan and "mlp_width" in run.plan and "attention_width" in run.plan:
        try:
            return LayerStructure.from_plan(run.plan)
        except (KeyError, TypeError, ValueError) as err:
            logger.warning("cannot read the layer structure from %s: %r", PLAN_FILE, err)
    refs = [s["plan"] for s in run.steps if isinstance(s.get("plan"), Mapping)]
    if not refs:
        return None
    layout = run.layout or {}

    def widest(key: str) -> int | None:
        return max((int(v) for r in refs for v in (r.get(key) or {}).values()), default=None)

    head_dim, num_heads = layout.get("head_dim"), layout.get("num_heads")
    return LayerStructure.from_reference(
        refs[-1],
        full_attention_width=head_dim * num_heads if head_dim and num_heads else widest("pruned_attn_width"),
        full_mlp_width=layout.get("mlp_width") or widest("pruned_mlp_width"),
        head_dim=head_dim,
        num_heads=num_heads,
    )


# =========================================================================== figures
def plot_trajectory(
    steps: Sequence[Mapping], dense_ppl: float | None = None, dense_width_ppl: float | None = None
) -> Figure:
    """Calibration perplexity (log scale) against the pruning ratio, one colour per stage.

    The width stages score on their own calibration set, so the curve jumps where they start; a dotted
    line marks that point and a hollow star the dense model's perplexity on the width set.
    """
    points = [
        (float(s["ratio"]), float(s["ppl"]), str(s.get("stage", "?")))
        for s in sorted(steps, key=lambda s: s.get("step", 0))
        if _num(s.get("ratio")) is not None and (_num(s.get("ppl")) or 0) > 0
    ]
    fig = _new_figure(8, 5)
    ax = fig.add_subplot()
    path = ([(0.0, dense_ppl)] if dense_ppl else []) + [(r, p) for r, p, _ in points]
    if path:
        ax.plot(*zip(*path, strict=True), color="0.7", lw=1, zorder=1)
    colors = _stage_colors([stage for _, _, stage in points])
    for stage, color in colors.items():
        xs = [r for r, _, s in points if s == stage]
        ys = [p for _, p, s in points if s == stage]
        ax.scatter(xs, ys, color=color, s=22, zorder=2, label=f"{stage} ({len(xs)} steps)")

    def dense_star(ppl: float, label: str, filled: bool) -> None:
        fill = {"color": "black"} if filled else {"facecolors": "none", "edgecolors": "black"}
        ax.scatter([0.0], [ppl], marker="*", s=180, zorder=3, label=label, **fill)

    if dense_ppl:
        dense_star(dense_ppl, f"dense (ppl {dense_ppl:.2f})", filled=True)
    block_ratios = [r for r, _, stage in points if stage == "block"]
    if dense_width_ppl and block_ratios and len(block_ratios) < len(points):
        ax.axvline(max(block_ratios), color="0.5", ls=":", lw=1, zorder=0)
        label = f"dense, width set (ppl {dense_width_ppl:.2f}): used from the dotted line on"
        dense_star(dense_width_ppl, label, filled=False)
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
    ax.set_ylabel("calibration perplexity (log scale)")
    ax.set_title("Search trajectory: perplexity of the chosen candidate at each step")
    ax.grid(True, which="both", alpha=0.3)
    if points or dense_ppl:
        ax.legend(loc="upper left")
    return fig


def _cell_states(structure: LayerStructure) -> list[list[int]]:
    """0 removed, 1 shrunk, 2 full -- per layer, rows attention then MLP."""
    rows = []
    for removed, widths, full in (
        (structure.removed_attention, structure.attention_width, structure.full_attention_width),
        (structure.removed_mlp, structure.mlp_width, structure.full_mlp_width),
    ):
        rows.append([0 if i in removed else 2 if w >= full else 1 for i, w in enumerate(widths)])
    return rows


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


def plot_structure(structure: LayerStructure, ratio: float | None = None) -> Figure:
    """Per layer: which blocks remain, how much MLP width and how many heads each kept."""
    n = structure.num_layers
    fig = _new_figure(max(8.0, 3.0 + 0.28 * n), 7.5)
    grid, mlp_ax, attn_ax = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [1.0, 1.4, 1.4]})

    cmap = ListedColormap([COLOR_REMOVED, COLOR_SHRUNK, COLOR_FULL])
    grid.imshow(
        _cell_states(structure),
        cmap=cmap,
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

    mlp_frac = [w / structure.full_mlp_width for w in structure.mlp_width]
    _kept_bars(mlp_ax, mlp_frac, structure.removed_mlp, 1.0)
    mlp_ax.set_ylabel(f"MLP width kept\n(fraction of {structure.full_mlp_width})")

    if structure.head_dim and structure.num_heads:
        heads = [w / structure.head_dim for w in structure.attention_width]
        _kept_bars(attn_ax, heads, structure.removed_attention, float(structure.num_heads))
        attn_ax.set_ylabel(f"query heads kept\n(of {structure.num_heads})")
    else:
        frac = [w / structure.full_attention_width for w in structure.attention_width]
        _kept_bars(attn_ax, frac, structure.removed_attention, 1.0)
        attn_ax.set_ylabel("query channels kept\n(fraction)")

    step = max(1, math.ceil(n / 40))
    attn_ax.set_xticks(range(0, n, step))
    attn_ax.set_xlim(-0.5, n - 0.5)
    attn_ax.set_xlabel("layer  (red × = block removed)")
    title = (
        f"Pruned structure: {len(structure.removed_attention)} of {n} attention and "
        f"{len(structure.removed_mlp)} of {n} MLP blocks removed"
    )
    if ratio is not None:
        title += f"; {ratio:.1f}% of parameters pruned"
    fig.suptitle(title)
    return fig


def task_keys(*evals: Mapping | None) -> list[str]:
    """Task accuracy keys present in any eval dict: known tasks in paper order, then unknown ones."""
    present: dict[str, None] = {}
    for ev in evals:
        for key, value in (ev or {}).items():
            if key in NON_TASK_KEYS or _num(value) is None or not 0 <= value <= 100:
                continue
            if key in TASK_LABELS or not any(
                w in key for w in ("param", "ppl", "ratio", "time", "len", "size")
            ):
                present[key] = None
    known = [k for k in TASK_LABELS if k in present]
    return known + sorted(k for k in present if k not in TASK_LABELS)


def plot_comparison(
    eval_dense: Mapping | None, eval_pruned: Mapping | None, speed_ratios: Mapping | None
) -> Figure | None:
    """Dense vs pruned: grouped accuracy bars and a panel of speed/size ratios; None if no data."""
    tasks = task_keys(eval_dense, eval_pruned)
    accs = (
        [*tasks, AVG_KEY]
        if any(_num((e or {}).get(AVG_KEY)) is not None for e in (eval_dense, eval_pruned))
        else tasks
    )
    ratios = {
        k: _num(v) for k, v in (speed_ratios or {}).items() if k in SPEED_RATIO_LABELS and _num(v) is not None
    }
    panels = int(bool(accs)) + int(bool(ratios))
    if not panels:
        return None
    width = (2.0 + 0.9 * len(accs) if accs else 0.0) + (5.0 if ratios else 0.0)
    fig = _new_figure(max(7.0, width), 4.8)
    width_ratios = [w for w, used in ((max(len(accs), 3), accs), (3, ratios)) if used]
    axes = list(fig.subplots(1, panels, width_ratios=width_ratios, squeeze=False)[0])
    if accs:
        _accuracy_panel(axes.pop(0), accs, eval_dense or {}, eval_pruned or {})
    if ratios:
        _ratio_panel(axes.pop(0), ratios)
    fig.suptitle("Dense vs pruned model")
    return fig


def _accuracy_panel(ax, keys: Sequence[str], dense: Mapping, pruned: Mapping) -> None:
    xs = range(len(keys))
    for offset, data, color, name in (
        (-0.2, dense, COLOR_DENSE, "dense"),
        (0.2, pruned, COLOR_PRUNED, "pruned"),
    ):
        values = [_num(data.get(k)) for k in keys]
        bars = ax.bar(
            [x + offset for x in xs], [v or 0.0 for v in values], width=0.4, color=color, label=name
        )
        ax.bar_label(bars, labels=[_fmt(v, ".1f") for v in values], fontsize=7, padding=1)
    ax.set_xticks(
        list(xs),
        [TASK_LABELS.get(k, "5-task avg" if k == AVG_KEY else k) for k in keys],
        rotation=30 if len(keys) > 5 else 0,
        ha="right" if len(keys) > 5 else "center",
    )
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


# =========================================================================== markdown
def _params_pair(run: RunData) -> tuple[float | None, float | None]:
    """Dense and pruned parameter counts from the most authoritative file that has them."""
    plan_params = (run.plan or {}).get("params") or {}
    bench_models = (run.bench or {}).get("models") or {}
    dense = (
        _num((run.eval_dense or {}).get("pruned_model_params"))
        or _num((run.eval_dense or {}).get("total_params"))
        or _num(plan_params.get("dense"))
        or _num((run.eval_pruned or {}).get("total_params"))
        or _num((bench_models.get("dense") or {}).get("params"))
        or _num((run.dense_step or {}).get("params"))
        or _dense_params_from_step(run.steps[-1] if run.steps else {})
    )
    pruned = (
        _num((run.eval_pruned or {}).get("pruned_model_params"))
        or _num(plan_params.get("pruned"))
        or _num((bench_models.get("pruned") or {}).get("params"))
        or (_num(run.steps[-1].get("params")) if run.steps else None)
    )
    return dense, pruned


def _dense_params_from_step(step: Mapping) -> float | None:
    """A step records pruned params and ratio = 100 * (1 - pruned / dense), so dense follows from them."""
    params, ratio = _num(step.get("params")), _num(step.get("ratio"))
    if params is None or ratio is None or ratio >= 100:
        return None
    return float(round(params / (1.0 - ratio / 100.0)))


def final_ratio(run: RunData) -> float | None:
    return (
        _num(((run.plan or {}).get("params") or {}).get("ratio"))
        or _num((run.eval_pruned or {}).get("ratio"))
        or (_num(run.steps[-1].get("ratio")) if run.steps else None)
    )


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    marks = {"l": ":--", "r": "--:", "c": ":-:"}
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(marks[a] for a in align) + " |",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def comparison_rows(run: RunData) -> list[tuple[str, str, str, str]]:
    """(metric, dense, pruned, change) rows for the dense-vs-pruned table."""
    dense_ev, pruned_ev = run.eval_dense or {}, run.eval_pruned or {}
    dense_p, pruned_p = _params_pair(run)
    ratio = final_ratio(run)
    rows = [
        ("Parameters", _fmt_params(dense_p), _fmt_params(pruned_p), _fmt_times(_ratio(pruned_p, dense_p))),
        ("Pruning ratio (%)", "0.00", _fmt(ratio), "—"),
    ]
    d, p = _num(dense_ev.get("ppl_wikitext2")), _num(pruned_ev.get("ppl_wikitext2"))
    if d is not None or p is not None:
        rows.append(("WikiText-2 perplexity", _fmt(d), _fmt(p), _fmt_times(_ratio(p, d))))
    tasks = task_keys(dense_ev, pruned_ev)
    for key in tasks:
        d, p = _num(dense_ev.get(key)), _num(pruned_ev.get(key))
        label = f"{TASK_LABELS.get(key, key)} {_metric_name(dense_ev, pruned_ev, key)} (%)"
        rows.append((label, _fmt(d), _fmt(p), _fmt_points(d, p)))
    d, p = _num(dense_ev.get(AVG_KEY)), _num(pruned_ev.get(AVG_KEY))
    if d is not None or p is not None:
        rows.append(("5-task average acc (%)", _fmt(d), _fmt(p), _fmt_points(d, p)))
    else:
        # without WinoGrande (not available offline) the paper's average is undefined; the mean of
        # the tasks both models ran still shows the overall change
        shared = [
            k for k in tasks if _num(dense_ev.get(k)) is not None and _num(pruned_ev.get(k)) is not None
        ]
        if len(shared) > 1:
            d = sum(dense_ev[k] for k in shared) / len(shared)
            p = sum(pruned_ev[k] for k in shared) / len(shared)
            rows.append((f"Average of these {len(shared)} tasks (%)", _fmt(d), _fmt(p), _fmt_points(d, p)))
    rows.extend(_speed_rows(run.bench))
    return rows


def _metric_name(dense_ev: Mapping, pruned_ev: Mapping, task: str) -> str:
    """The metric behind a task's headline number, from the eval file's details (acc when they are absent)."""
    for ev in (pruned_ev, dense_ev):
        details = ((ev.get("details") or {}).get("tasks") or {}).get(task)
        if details:
            return headline_metric(details)
    return "acc"


def _speed_rows(bench: Mapping | None) -> list[tuple[str, str, str, str]]:
    if not bench:
        return []
    models = bench.get("models") or {}
    base = models.get(bench.get("baseline", "dense")) or {}
    cand = models.get(bench.get("candidate", "pruned")) or {}
    ratios = bench.get("ratios") or {}
    specs = (
        ("Prefill tokens/s", "prefill_tokens_per_s", "prefill_speedup", ".1f"),
        ("Decode tokens/s", "decode_tokens_per_s", "decode_speedup", ".1f"),
        ("Peak memory (MB)", "peak_memory_mb", "memory_ratio", ".1f"),
        ("Disk size (MB)", "disk_mb", "disk_ratio", ".1f"),
    )
    rows = []
    for label, field, ratio_key, spec in specs:
        d, p = _num(base.get(field)), _num(cand.get(field))
        if d is None and p is None:
            continue
        r = _num(ratios.get(ratio_key))
        rows.append((label, _fmt(d, spec), _fmt(p, spec), _fmt_times(r if r is not None else _ratio(p, d))))
    return rows


def _choice_text(choice: Mapping | None, head_dim: int | None) -> str:
    if not choice:
        return "—"
    kind, op, layer, width = (
        choice.get("kind", "?"),
        choice.get("op", "?"),
        choice.get("layer", "?"),
        choice.get("width"),
    )
    text = f"{op} {kind} L{layer}"
    if width is not None:
        text += f" → {width}"
        if kind == "attention" and head_dim:
            text += f" ({int(width) // head_dim} heads)"
    return text


def step_rows(run: RunData) -> list[tuple[str, ...]]:
    head_dim = (run.layout or {}).get("head_dim")
    rows = []
    if run.dense_step:
        rows.append(
            (
                "dense",
                "—",
                "—",
                _fmt(run.dense_ppl, ".3f"),
                "0.00",
                _fmt_params(_num(run.dense_step.get("params"))),
            )
        )
    for s in run.steps:
        rows.append(
            (
                str(s.get("step", "?")),
                str(s.get("stage", "?")),
                _choice_text(s.get("choice"), head_dim),
                _fmt(_num(s.get("ppl")), ".3f"),
                _fmt(_num(s.get("ratio"))),
                _fmt_params(_num(s.get("params"))),
            )
        )
    return rows


def _layout_text(layout: Mapping | None) -> str:
    if not layout:
        return "unknown (plan.json absent or without a layout)"
    return (
        f"{layout.get('model_type', 'decoder')}: {layout.get('num_layers')} layers, hidden {layout.get('hidden_size')}, "
        f"MLP width {layout.get('mlp_width')}, {layout.get('num_heads')} query / {layout.get('num_kv_heads')} KV heads "
        f"× head_dim {layout.get('head_dim')}"
    )


def _calibration_lines(run: RunData, final_ppl: float | None) -> list[str]:
    """Perplexities on the set each stage was scored on: blocks use one calibration set, widths another."""
    block_steps = [s for s in run.steps if s.get("stage") == "block"]
    dense_width = run.dense_width_ppl
    if dense_width is None:  # a run without the width-set dense number: one line, as recorded
        return [
            f"- **Calibration perplexity:** {_fmt(run.dense_ppl, '.3f')} (dense) → {_fmt(final_ppl, '.3f')} (final)"
        ]
    after_blocks = _num(block_steps[-1].get("ppl")) if block_steps else run.dense_ppl
    return [
        f"- **Calibration perplexity, block set** (block stage): {_fmt(run.dense_ppl, '.3f')} (dense) → "
        f"{_fmt(after_blocks, '.3f')} (after the block stage)",
        f"- **Calibration perplexity, width set** (width stages): {_fmt(dense_width, '.3f')} (dense) → "
        f"{_fmt(final_ppl, '.3f')} (final); the trajectory plot shows each step on the set it was scored on",
    ]


def summary_lines(run: RunData, structure: LayerStructure | None) -> list[str]:
    dense_p, pruned_p = _params_pair(run)
    counts = Counter(str(s.get("stage", "?")) for s in run.steps)
    stage_text = (
        ", ".join(f"{stage} {counts[stage]}" for stage in _stage_colors(list(counts))) or "none recorded"
    )
    elapsed = [_num(r.get("elapsed_s")) for r in ([run.dense_step] if run.dense_step else []) + run.steps]
    wall = sum(e for e in elapsed if e is not None) if any(e is not None for e in elapsed) else None
    final_ppl = _num(run.steps[-1].get("ppl")) if run.steps else None
    lines = [
        f"- **Model layout:** {_layout_text(run.layout)}",
        f"- **Pruning ratio reached:** {_fmt(final_ratio(run), '.2f', ' %')}",
        f"- **Parameters:** {_fmt_params(dense_p)} → {_fmt_params(pruned_p)}",
        f"- **Search steps:** {len(run.steps)} ({stage_text})",
        f"- **Search wall time:** {_fmt_duration(wall)} (sum of per-step times; excludes loading and evaluation)",
        *_calibration_lines(run, final_ppl),
    ]
    if structure is not None:
        lines.append(
            f"- **Removed blocks:** attention {sorted(structure.removed_attention) or 'none'}; "
            f"MLP {sorted(structure.removed_mlp) or 'none'}"
        )
    return lines


def render_markdown(run: RunData, structure: LayerStructure | None, figures: Mapping[str, str]) -> str:
    """The report page; ``figures`` maps a written PNG's file name to its caption."""
    parts = [
        f"# MultiPruner report: `{run.run_dir.name}`",
        "",
        "## Summary",
        "",
        *summary_lines(run, structure),
        "",
    ]
    parts += ["## Dense vs pruned", ""]
    parts += _md_table(("Metric", "Dense", "Pruned", "Pruned vs dense"), comparison_rows(run))
    parts += ["", "Ratios are pruned / dense (×); accuracy changes are in percentage points (pt).", ""]
    if run.bench:
        some = next(iter((run.bench.get("models") or {}).values()), {})
        parts += [
            f"Speed measured with batch {some.get('batch_size')}, {some.get('seqlen')}-token prefill, "
            f"{some.get('new_tokens')} decoded tokens on {some.get('device', '?')}; "
            f"memory method: {some.get('memory_method', '?')}.",
            "",
        ]
    if figures:
        parts += ["## Figures", ""]
        for name, caption in figures.items():
            parts += [f"### {caption}", "", f"![{caption}]({name})", ""]
    parts += ["## Search steps", ""]
    rows = step_rows(run)
    if rows:
        parts += _md_table(("Step", "Stage", "Choice", "Calib. PPL", "Ratio (%)", "Params"), rows, "rllrrr")
    else:
        parts.append("No search steps recorded.")
    return "\n".join(parts) + "\n"


# =========================================================================== entry point
def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``report.md`` and its PNGs into ``out_dir`` (default: the run directory); return the report path."""
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.run_dir
    out.mkdir(parents=True, exist_ok=True)
    structure = structure_of_run(run)
    figures: dict[str, str] = {}

    def emit(fig: Figure | None, name: str, caption: str) -> None:
        if fig is not None:
            save_figure(fig, out / name)
            figures[name] = caption

    if run.steps or run.dense_ppl:
        emit(
            plot_trajectory(run.steps, run.dense_ppl, run.dense_width_ppl),
            TRAJECTORY_PNG,
            "Calibration perplexity vs pruning ratio",
        )
    if structure is not None and structure.num_layers:
        emit(plot_structure(structure, final_ratio(run)), STRUCTURE_PNG, "Layer structure after pruning")
    emit(
        plot_comparison(run.eval_dense, run.eval_pruned, (run.bench or {}).get("ratios")),
        COMPARISON_PNG,
        "Dense vs pruned: accuracy and speed",
    )
    report = out / REPORT_FILE
    atomic_write_bytes(report, render_markdown(run, structure, figures).encode())  # UTF-8 whatever the locale
    logger.info("wrote %s (%d figures)", report, len(figures))
    return report
