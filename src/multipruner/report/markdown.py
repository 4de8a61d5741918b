"""report.md: a summary, the dense-vs-pruned table, the figures and the search steps of one run.

Every table goes through ``tables.render_table`` (the package's one renderer); every missing value is
shown as "—" rather than estimated.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Mapping

from ..search.loop import StepRecord
from ..search.stages import Candidate
from ..tables import render_table
from .run_data import (
    CALIBRATION_SETS,
    RunData,
    accuracy_tasks,
    comparison_metric,
    mean_label,
    metric_of,
    perplexity_tasks,
    shared_accuracy_tasks,
    task_label,
)

log = logging.getLogger(__name__)

MISSING = "—"
FULL_EVAL_TASKS = "wikitext2,ptb"  # the held-out texts of the papers' perplexity tables
COMPARISON_HEADER = ("Metric", "Dense", "Pruned", "Pruned vs dense")
STEPS_HEADER = ("Step", "Stage", "Choice", "Calib. PPL", "Ratio (%)", "Params")
SPEED_ROWS = (  # label, SpeedResult field, compare_speed ratio
    ("Prefill tokens/s", "prefill_tokens_per_s", "prefill_speedup"),
    ("Decode tokens/s", "decode_tokens_per_s", "decode_speedup"),
    ("Peak memory (MB)", "peak_memory_mb", "memory_ratio"),
    ("Disk size (MB)", "disk_mb", "disk_ratio"),
)


# --- formatting ----------------------------------------------------------------------------------
def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return MISSING if value is None else f"{format(value, spec)}{suffix}"


def fmt_params(n: int | None) -> str:
    if n is None:
        return MISSING
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def fmt_times(num: float | None, den: float | None) -> str:
    return MISSING if num is None or not den else f"{num / den:.3f}×"


def fmt_percent(value: float, stderr: float | None) -> str:
    """A fraction in percent, with its standard error in points when recorded."""
    return f"{100 * value:.2f}" + ("" if stderr is None else f" ± {100 * stderr:.2f}")


def fmt_points(dense: float, pruned: float) -> str:
    return f"{100 * (pruned - dense):+.2f} pt"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    h, rem = divmod(int(round(seconds)), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s" if m else f"{seconds:.1f}s"


# --- summary -------------------------------------------------------------------------------------
def _layout_text(run: RunData) -> str:
    lay = run.layout
    if lay is None:
        return MISSING
    return (
        f"{lay.model_type}: {lay.num_layers} layers, hidden {lay.hidden_size}, MLP width {lay.mlp_width}, "
        f"{lay.num_heads} query / {lay.num_kv_heads} KV heads × head_dim {lay.head_dim}"
    )


def _calibration_lines(run: RunData) -> list[str]:
    """The block stage scores on one calibration set, the width stages on another: one line per set."""
    final = run.final_ppl
    dense = {
        "block": run.dense.ppl if run.dense else None,
        "width": run.dense.ppl_width if run.dense else None,
    }
    lines = []
    for name in CALIBRATION_SETS:
        score = run.score_name(name)
        line = f"- **{score[:1].upper() + score[1:]}, {name} set:** {fmt(dense[name], '.3f')} (dense) → "
        line += f"{fmt(final.get(name), '.3f')} (final)"
        after_blocks = run.ppl_after_stage("block")
        if name == "block" and after_blocks is not None and run.steps[-1].stage != "block":
            line += f"; {after_blocks:.3f} after the block stage"
        lines.append(line)
    return lines


def summary_lines(run: RunData) -> list[str]:
    stages = ", ".join(f"{stage} {n}" for stage, n in run.steps_per_stage.items()) or "none recorded"
    racing = run.racing
    racing_text = (
        MISSING
        if racing is None
        else f"{racing[0]} of {racing[2]} candidate-batches skipped ({100 * racing[0] / racing[2]:.1f} %); "
        f"{racing[1]} more ran without their full LM head ({100 * racing[1] / racing[2]:.1f} %, ruled out by "
        "a lower bound on their loss)"
    )
    lines = [f"- **Model:** `{run.manifest.source.spec}`"] if run.manifest else []
    lines += [
        f"- **Model layout:** {_layout_text(run)}",
        *([f"- **Budget:** {run.budget}"] if run.budget else []),
        f"- **Pruning ratio reached:** {fmt(run.final_ratio, '.2f', ' %')}",
        f"- **Parameters:** {fmt_params(run.dense_params)} → {fmt_params(run.pruned_params)}",
        f"- **Search steps:** {len(run.steps)} ({stages})",
        f"- **Search wall time:** {fmt_duration(run.search_wall_s)} "
        "(dense scoring and every step; excludes loading and evaluation)",
        f"- **Racing:** {racing_text}",
        *_calibration_lines(run),
    ]
    if run.plan is None:
        lines.append(f"- **Removed blocks:** {MISSING}")
    else:
        attention, mlp = sorted(run.plan.removed_attention), sorted(run.plan.removed_mlp)
        lines.append(f"- **Removed blocks:** attention {attention or 'none'}; MLP {mlp or 'none'}")
    return lines


# --- dense vs pruned -----------------------------------------------------------------------------
def comparison_rows(run: RunData) -> list[tuple[str, str, str, str]]:
    dense, pruned = run.eval_dense, run.eval_pruned
    dense_n, pruned_n = run.dense_params, run.pruned_params
    rows = [
        ("Parameters", fmt_params(dense_n), fmt_params(pruned_n), fmt_times(pruned_n, dense_n)),
        ("Pruning ratio (%)", "0.00", fmt(run.final_ratio), MISSING),
    ]
    for task in perplexity_tasks(dense, pruned):
        d, p = (metric_of(r, task, "ppl") for r in (dense, pruned))
        d_value, p_value = (None if m is None else m.value for m in (d, p))
        rows.append(
            (f"{task_label(task)} perplexity", fmt(d_value), fmt(p_value), fmt_times(p_value, d_value))
        )
    for task in accuracy_tasks(dense, pruned):
        metric = comparison_metric(task, dense, pruned)
        d, p = (metric_of(r, task, metric) for r in (dense, pruned))
        cells = [MISSING if m is None else fmt_percent(m.value, m.stderr) for m in (d, p)]
        change = fmt_points(d.value, p.value) if d and p else MISSING
        rows.append((f"{task_label(task)} {metric} (%)", *cells, change))
    shared = shared_accuracy_tasks(dense, pruned)
    if len(shared) > 1:
        d_mean, p_mean = dense.mean_accuracy(shared), pruned.mean_accuracy(shared)
        cells = [MISSING if m is None else fmt_percent(*m) for m in (d_mean, p_mean)]
        change = fmt_points(d_mean[0], p_mean[0]) if d_mean and p_mean else MISSING
        rows.append((f"{mean_label(shared)} (%)", *cells, change))
    return rows + _speed_rows(run.bench)


def stage_rows(run: RunData) -> list[tuple[str, ...]]:
    """One row per measure, one column per model: dense, then each stage the run made."""
    columns = [("dense", run.eval_dense), *run.stage_evals]
    results = [r for _, r in columns if r is not None]
    rows: list[tuple[str, ...]] = []
    for task in perplexity_tasks(*results):
        cells = [metric_of(r, task, "ppl") if r is not None else None for _, r in columns]
        rows.append((f"{task_label(task)} perplexity", *(fmt(None if m is None else m.value) for m in cells)))
    for task in accuracy_tasks(*results):
        metric = comparison_metric(task, *results[:2])
        cells = [metric_of(r, task, metric) if r is not None else None for _, r in columns]
        rows.append(
            (
                f"{task_label(task)} {metric} (%)",
                *(MISSING if m is None else fmt_percent(m.value, m.stderr) for m in cells),
            )
        )
    shared = shared_accuracy_tasks(*results)
    if len(shared) > 1:
        means = [r.mean_accuracy(shared) if r is not None else None for _, r in columns]
        rows.append(
            (f"{mean_label(shared)} (%)", *(MISSING if m is None else fmt_percent(*m) for m in means))
        )
    return rows


def _speed_rows(bench: Mapping | None) -> list[tuple[str, str, str, str]]:
    if not bench:
        return []
    models = bench["models"]
    base = models.get(bench.get("baseline", "dense")) or {}
    cand = models.get(bench.get("candidate", "pruned")) or {}
    ratios = bench.get("ratios") or {}
    rows = []
    for label, field, ratio_key in SPEED_ROWS:
        d, p = base.get(field), cand.get(field)
        if d is None and p is None:
            continue
        ratio = ratios.get(ratio_key)
        rows.append((label, fmt(d, ".1f"), fmt(p, ".1f"), MISSING if ratio is None else f"{ratio:.3f}×"))
    return rows


def _notes(run: RunData) -> list[str]:
    notes = ["Ratios are pruned / dense (×); accuracy changes are in percentage points (pt), ± one stderr."]
    result = run.eval_pruned or run.eval_dense
    meta = result.meta if result is not None else None
    if meta is not None and meta.limit and accuracy_tasks(*(r for _, r in run.evaluations)):
        notes.append(f"Zero-shot accuracies are measured on the first {meta.limit} examples of each task.")
    if meta is not None and meta.seqlen and (windows := _windows_text(run)):
        notes.append(f"Perplexities use windows of {meta.seqlen} tokens ({windows}).")
    if run.bench:
        some = next(iter(run.bench["models"].values()), {})
        notes.append(
            f"Speed measured with batch {some.get('batch_size')}, {some.get('seqlen')}-token prefill, "
            f"{some.get('new_tokens')} decoded tokens on {some.get('device', '?')}; "
            f"memory method: {some.get('memory_method', '?')}."
        )
    return notes


def _windows_text(run: RunData) -> str:
    """How many windows each perplexity text was scored on, e.g. "WikiText-2: 8 windows"."""
    results = [result for _, result in run.evaluations]
    parts = []
    for task in perplexity_tasks(*results):
        counts = sorted({m.n for r in results if (m := metric_of(r, task, "ppl")) is not None and m.n})
        if counts:
            parts.append(f"{task_label(task)}: {'/'.join(map(str, counts))} windows")
    return ", ".join(parts)


def full_eval_commands(run: RunData) -> list[str]:
    """One ``multipruner eval`` per model the run evaluated and can still name (its source, its saved
    directories), on every window of WikiText-2 and PTB: the full numbers behind a run's quick check."""
    models = [run.manifest.source.spec] if run.manifest is not None and run.eval_dense is not None else []
    evaluated = {stage for stage, _ in run.stage_evals}
    models += [str(path) for stage, path in run.saved_models if stage in evaluated]
    return [f"multipruner eval --model {shlex.quote(m)} --tasks {FULL_EVAL_TASKS}" for m in models]


def full_numbers_lines(run: RunData) -> list[str]:
    commands = full_eval_commands(run)
    if not commands or not any(r.perplexity_tasks() for _, r in run.evaluations):
        return []
    intro = (
        "The perplexities above are a quick check on the windows noted; the full numbers (every window of "
        "the test texts) come from:"
    )
    return [intro, "", "```sh", *commands, "```", ""]


# --- search steps --------------------------------------------------------------------------------
def choice_text(step: StepRecord, head_dim: int | None) -> str:
    if not step.choice:
        return MISSING
    choice = Candidate.from_dict(step.choice)
    text = f"{choice.op} {choice.kind} L{choice.layer}"
    if choice.width is not None:
        text += f" → {choice.width}"
        if choice.kind == "attention" and head_dim:
            text += f" ({choice.width // head_dim} heads)"
    return text


def step_rows(run: RunData) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    if run.dense is not None:
        params = run.dense.params or None  # DenseRecord reads an unrecorded count as 0
        rows.append(("dense", MISSING, MISSING, fmt(run.dense.ppl, ".3f"), "0.00", fmt_params(params)))
    for s in run.steps:
        rows.append(
            (
                str(s.step),
                s.stage,
                choice_text(s, run.head_dim),
                fmt(s.ppl, ".3f"),
                fmt(s.ratio),
                fmt_params(s.params),
            )
        )
    return rows


def settings_rows(run: RunData) -> list[tuple[str, str, str]]:
    """Every recorded setting, group by group, as run.json holds them (so a new setting shows itself)."""
    if run.manifest is None:
        return []
    rows = []
    for group, values in run.manifest.settings.items():
        for key, value in values.items():
            shown = (
                ":".join(f"{v:g}" for v in value)
                if isinstance(value, list) and key == "distribution"
                else value
            )
            rows.append((group, key, MISSING if shown is None else f"`{shown}`"))
    return rows


# --- the page ------------------------------------------------------------------------------------
def render_markdown(run: RunData, figures: Mapping[str, str]) -> str:
    """The report page; ``figures`` maps each written PNG's file name to its caption."""
    parts = [f"# MultiPruner report: `{run.run_dir.name}`", "", "## Summary", "", *summary_lines(run), ""]
    parts += ["## Dense vs pruned", "", render_table(COMPARISON_HEADER, comparison_rows(run), markdown=True)]
    parts += ["", *(f"{note}\n" for note in _notes(run))]
    if len(run.stage_evals) > 1:
        header = ("Metric", "Dense", *(stage.capitalize() for stage, _ in run.stage_evals))
        parts += ["## Winning back quality: pruned → compensated → recovered", ""]
        parts += [render_table(header, stage_rows(run), markdown=True), ""]
    parts += full_numbers_lines(run)
    if figures:
        parts += ["## Figures", ""]
        for name, caption in figures.items():
            parts += [f"### {caption}", "", f"![{caption}]({name})", ""]
    parts += ["## Search steps", ""]
    rows = step_rows(run)
    parts.append(render_table(STEPS_HEADER, rows, "rllrrr", markdown=True) if rows else "No steps recorded.")
    if settings := settings_rows(run):
        parts += [
            "",
            "## Settings",
            "",
            render_table(("group", "setting", "value"), settings, "lll", markdown=True),
        ]
    return "\n".join(parts) + "\n"
