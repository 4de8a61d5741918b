"""The tables a command ends with on the terminal: a prune run's before/after, a compensation's fits."""

from __future__ import annotations

import json

from ..evaluation.results import EvalResult
from ..repair.compensate import BranchFit
from ..run.run_dir import MODEL_STAGES, RunDirectory
from ..tables import render_table
from .run_data import score_name


def prune_summary(run: RunDirectory) -> str:
    """The before/after table a prune run ends with, from what it wrote."""
    manifest = run.manifest()
    plan, layout = run.plan()
    dense = run.dense_record()
    final = manifest.phases.get("search", {}).get("final_ppl", {})
    score = {name: score_name(manifest.settings.get("search", {}), name) for name in ("block", "width")}
    rows = [
        ("parameters", f"{layout.dense_params():,}", f"{plan.num_params(layout):,}"),
        (f"{score['block']}, block set", f"{dense.ppl:.3f}", f"{final.get('block', float('nan')):.3f}"),
        (f"{score['width']}, width set", f"{dense.ppl_width:.3f}", f"{final.get('width', float('nan')):.3f}"),
    ]
    evals = {
        w: EvalResult.read(run.eval_file(w)) for w in ("dense", *MODEL_STAGES) if run.eval_file(w).is_file()
    }
    header = ("", "dense", "pruned")
    if "dense" in evals and len(evals) > 1:
        stages = [w for w in evals if w != "dense"]
        header = ("", "dense", *stages)
        rows = [(*row, *[""] * (len(stages) - 1)) for row in rows]
        for task in evals["dense"].tasks:
            name, base = evals["dense"].headline(task)
            scale, spec = (1, ".2f") if name == "ppl" else (100, ".1f")
            values = [
                format(evals[w].headline(task)[1].value * scale, spec) if task in evals[w].tasks else "—"
                for w in stages
            ]
            rows.append((f"{task} {name}", format(base.value * scale, spec), *values))
    steps = manifest.phases.get("search", {}).get("steps", 0)
    lines = [
        render_table(header, rows),
        f"pruning ratio {plan.ratio(layout):.2f}% after {steps} steps; run directory {run.path}",
        "plan: " + json.dumps(plan.to_reference()),
    ]
    return "\n".join(lines)


def compensation_table(fits: list[BranchFit]) -> str:
    """One row per refitted branch: its reconstruction error before and after the fit."""
    rows = [
        (
            f.layer,
            f.kind,
            f"{f.kept}/{f.full}",
            f"{f.error_before:.4g}",
            f"{f.error_after:.4g}",
            f"{f.error_after / f.error_before:.3f}" if f.error_before else "—",
        )
        for f in fits
    ]
    return render_table(
        ("layer", "branch", "kept", "error before", "error after", "ratio"), rows, align="rllrrr"
    )
