"""Quality of MultiPruner against the baselines inside the same tool: one table, every cell measured.

Cells: models x methods (multipruner, blockpruner, shortgpt) x ratios, plus each model's dense row. A cell
runs ``multipruner prune`` (search only) into its own run directory, then evaluates the pruned model on
text the search never saw: WikiText-2 test and PTB test perplexity, and zero-shot accuracy (lm-eval) on
PIQA, ARC-Easy, HellaSwag, BoolQ and OpenBookQA, all with the same settings. Every cell is written to
the JSON file as soon as it finishes; a cell already there is not recomputed (delete it to redo it), and
a killed search resumes from its last step. The Markdown table and the figure are rebuilt from the JSON.

    .venv/bin/python benchmarks/quality.py                      # everything (many hours on 2 CPU cores)
    .venv/bin/python benchmarks/quality.py --models smollm2-135m --ratios 10
    .venv/bin/python benchmarks/quality.py --table-only         # rebuild docs/quality-table.md and the figure from the JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import time
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from multipruner.core.extract import extract
from multipruner.core.surgery import PrunableModel
from multipruner.evaluation.results import EvalResult
from multipruner.evaluation.runner import EvalSettings, evaluate
from multipruner.io_utils import atomic_write_bytes, atomic_write_text
from multipruner.models import ModelSettings
from multipruner.run.pipeline import PruneJob, RunOptions, prune
from multipruner.run.run_dir import RunDirectory
from multipruner.search.calibration import CalibrationSettings
from multipruner.search.settings import METHODS, SearchSettings
from multipruner.tables import render_table

log = logging.getLogger("quality")

PPL_TASKS = ("wikitext2", "ptb")
ZERO_SHOT = ("piqa", "arc_easy", "hellaswag", "boolq", "openbookqa")


@dataclasses.dataclass(frozen=True)
class Variant:
    """A row that is another method with some search or calibration settings fixed."""

    method: str
    search: dict = dataclasses.field(default_factory=dict)
    calibration: dict = dataclasses.field(default_factory=dict)


VARIANTS = {
    # the paper's channel order (today's default orders by activations)
    "multipruner-l1": Variant("multipruner", search={"channel_importance": "l1"}),
    # twice the default width set: does a width stage of many steps overfit less (docs/quality.md §3d)
    "multipruner-width2048": Variant("multipruner", calibration={"width_tokens": 2048}),
}
# rows for the models a reused run saved after its search ("<method>+compensate", ...), and where it keeps them
DERIVED_SUFFIXES = {"+compensate": "model-compensated", "+compensate+recover": "model-recovered"}
DERIVED = tuple(f"{m}{suffix}" for m in ("multipruner", "multipruner-l1") for suffix in DERIVED_SUFFIXES)
ROW_ORDER = (
    "dense",
    *(m + suffix for m in ("multipruner", "multipruner-l1") for suffix in ("", *DERIVED_SUFFIXES)),
    "multipruner-width2048",
    "blockpruner",
    "shortgpt",
)
LABELS = {
    "wikitext2": "WikiText-2",
    "ptb": "PTB",
    "piqa": "PIQA",
    "arc_easy": "ARC-e",
    "hellaswag": "HellaSwag",
}
LABELS |= {"boolq": "BoolQ", "openbookqa": "OBQA"}


def cell_key(model: str, method: str, ratio: float | None) -> str:
    return f"{model}/{method}" + ("" if ratio is None else f"/{ratio:g}")


def eval_settings(args) -> EvalSettings:
    """The evaluation of this invocation: ``args.tasks`` (only the tasks a cell still lacks, see main)."""
    return EvalSettings(
        tasks=list(args.tasks),
        limit=args.limit,
        seqlen=args.eval_seqlen,
        max_windows=args.max_windows,
    )


def run_cell(args, model: str, method: str, ratio: float) -> dict:
    key = cell_key(model, method, ratio)
    reused = dict(item.split("=", 1) for item in args.reuse)
    run_dir = Path(reused.get(key) or Path(args.runs) / Path(model).name / f"{method}-{ratio:g}")
    variant = VARIANTS.get(method, Variant(method))
    overrides = {**variant.search, **json.loads(args.search_overrides).get(model, {})}
    if key in reused:  # a finished search made elsewhere (e.g. the main job): evaluate its plan as it is
        command = f"(search reused from {run_dir})"
    else:
        job = PruneJob(
            model=ModelSettings(model=model, device="cpu"),
            calibration=CalibrationSettings(**variant.calibration),
            search=SearchSettings(method=variant.method, target_ratio=ratio, **overrides),
            run=RunOptions(output_path=str(run_dir), resume=RunDirectory(run_dir).exists()),
            progress=False,
        )
        prune(job)
        flags = " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in {**variant.calibration, **overrides}.items()
        )
        command = f"multipruner prune --model {model} --method {variant.method} --target-ratio {ratio:g} " + (
            f"--output-path {run_dir} {flags}".strip()
        )
    run = RunDirectory(run_dir)
    manifest = run.manifest()
    plan, layout = run.plan()
    steps = run.step_records()
    model_obj, tokenizer = ModelSettings(model=model, device="cpu").load()
    pruned = extract(PrunableModel.from_plan(model_obj, plan), plan)
    result = evaluate(
        pruned, tokenizer, eval_settings(args), name=str(run_dir), dense_params=layout.dense_params()
    )
    return {
        "model": model,
        "method": method,
        "target_ratio": ratio,
        "ratio": plan.ratio(layout),
        "params": plan.num_params(layout),
        "dense_params": layout.dense_params(),
        "search_s": sum(s.get("elapsed_s", 0.0) for s in steps),
        "steps": len(steps),
        "plan": plan.to_reference(),
        # what the search really used, from the run's own record
        "calibration": manifest.settings.get("calibration"),
        "search": manifest.settings.get("search"),
        "eval": result.to_dict(),
        "commands": [
            command,
            f"multipruner eval --model {model} --plan {run_dir}/plan.json {eval_flags(args)}",
        ],
    }


def eval_flags(args) -> str:
    flags = f"--tasks {','.join(args.tasks)} --limit {args.limit} --seqlen {args.eval_seqlen}"
    return flags + (f" --max-windows {args.max_windows}" if args.max_windows else "")


def run_derived(args, model: str, ratio: float, method: str) -> dict:
    """A model a reused multipruner run saved after its search (``model-compensated/``, ``model-recovered/``)."""
    from multipruner.core.checkpoint import load_pruned

    reused = dict(item.split("=", 1) for item in args.reuse)
    base = method.split("+", 1)[0]
    run_dir = Path(reused[cell_key(model, base, ratio)])
    saved = run_dir / DERIVED_SUFFIXES[method[len(base) :]]
    pruned, tokenizer = load_pruned(saved)
    plan, layout = RunDirectory(run_dir).plan()
    result = evaluate(
        pruned, tokenizer, eval_settings(args), name=str(saved), dense_params=layout.dense_params()
    )
    meta = json.loads((saved / "multipruner_plan.json").read_text())["meta"]
    return {
        "model": model,
        "method": method,
        "target_ratio": ratio,
        "ratio": plan.ratio(layout),
        "params": plan.num_params(layout),
        "dense_params": layout.dense_params(),
        **{step: meta[step] for step in ("compensation", "recovery") if step in meta},
        "eval": result.to_dict(),
        "commands": [f"multipruner eval --model {saved} {eval_flags(args)}"],
    }


def run_dense(args, model: str) -> dict:
    settings = ModelSettings(model=model, device="cpu")
    dense, tokenizer = settings.load()
    result = evaluate(dense, tokenizer, eval_settings(args), name=model)
    params = sum(p.numel() for p in dense.parameters())
    return {
        "model": model,
        "method": "dense",
        "target_ratio": 0.0,
        "ratio": 0.0,
        "params": params,
        "dense_params": params,
        "eval": result.to_dict(),
        "commands": [f"multipruner eval --model {model} {eval_flags(args)}"],
    }


# --- the table -----------------------------------------------------------------------------------------
def _fmt_acc(metric) -> str:
    if metric is None:
        return "—"
    error = "" if metric.stderr is None else f" ± {100 * metric.stderr:.1f}"
    return f"{100 * metric.value:.1f}{error}"


def table_rows(cells: list[dict], model: str) -> list[list[str]]:
    rows = []
    ordered = sorted(
        (c for c in cells if c["model"] == model),
        key=lambda c: (c["target_ratio"], ROW_ORDER.index(c["method"])),
    )
    for cell in ordered:
        result = EvalResult.from_dict(cell["eval"])
        ppl = [f"{result.tasks[t]['ppl'].value:.2f}" if t in result.tasks else "—" for t in PPL_TASKS]
        accs = [_fmt_acc(result.headline(t)[1]) if t in result.tasks else "—" for t in ZERO_SHOT]
        mean = result.mean_accuracy(ZERO_SHOT)
        avg = "—" if mean is None else f"{100 * mean[0]:.2f}" + (f" ± {100 * mean[1]:.2f}" if mean[1] else "")
        search = "—" if cell.get("search_s") is None else f"{cell['search_s'] / 60:.0f} min"
        rows.append(
            [
                cell["method"],
                f"{cell['target_ratio']:g} %" if cell["method"] != "dense" else "—",
                f"{cell['ratio']:.2f} %",
                *ppl,
                *accs,
                avg,
                search,
            ]
        )
    return rows


# a perplexity above this multiple of the dense one is drawn at the top edge and labelled with its value:
# one destroyed model (ShortGPT at 20 % on Gemma, ~1e11) would otherwise flatten every other line
OFF_SCALE_FACTOR = 100.0


def clip_off_scale(points: list[tuple[float, float]], ceiling: float | None):
    """Points for a log-scale plot: those above ``ceiling`` move onto it; also returns the moved ones."""
    if ceiling is None:
        return list(points), []
    drawn = [(x, min(y, ceiling)) for x, y in points]
    return drawn, [(x, y) for x, y in points if y > ceiling]


def build_figure(cells: list[dict]) -> Figure:
    """One panel per model and perplexity task: each method's perplexity against the parameters it removed."""
    models = sorted({c["model"] for c in cells})
    fig = Figure(figsize=(5.2 * len(PPL_TASKS), 3.6 * len(models)), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(models), len(PPL_TASKS), squeeze=False)
    for row, model in enumerate(models):
        dense = next((c for c in cells if c["model"] == model and c["method"] == "dense"), None)
        for col, task in enumerate(PPL_TASKS):
            ax = axes[row][col]
            dense_ppl = EvalResult.from_dict(dense["eval"]).tasks[task]["ppl"].value if dense else None
            ceiling = dense_ppl * OFF_SCALE_FACTOR if dense_ppl else None
            clipped_any = False
            # one colour per method across panels, so a line means the same thing in every plot
            for colour, method in enumerate(ROW_ORDER[1:]):
                points = sorted(
                    (c["ratio"], EvalResult.from_dict(c["eval"]).tasks[task]["ppl"].value)
                    for c in cells
                    if c["model"] == model and c["method"] == method
                )
                if dense_ppl:
                    points.insert(0, (0.0, dense_ppl))
                if len(points) <= int(dense is not None):
                    continue
                drawn, off_scale = clip_off_scale(points, ceiling)
                (line,) = ax.plot(*zip(*drawn, strict=True), marker="o", label=method, color=f"C{colour}")
                for x, y in off_scale:
                    clipped_any = True
                    ax.plot([x], [ceiling], marker="^", markersize=10, color=line.get_color())
                    ax.annotate(
                        f"{y:.1e}",
                        (x, ceiling),
                        textcoords="offset points",
                        xytext=(-8, -14),
                        ha="right",
                        fontsize=8,
                        color=line.get_color(),
                    )
            ax.set_yscale("log")
            if clipped_any:
                ax.set_ylim(top=ceiling * 1.6)
            ax.set_title(f"{model}: {LABELS[task]} test")
            ax.set_xlabel("parameters removed (%)")
            ylabel = "perplexity (log scale)"
            if clipped_any:
                ylabel += f"; ▲ above {OFF_SCALE_FACTOR:g}× dense, value shown"
            ax.set_ylabel(ylabel, fontsize=8 if clipped_any else None)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    return fig


def plot(cells: list[dict], path: Path) -> None:
    buffer = io.BytesIO()
    build_figure(cells).savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def write_markdown(cells: list[dict], args) -> None:
    header = ["method", "target", "removed", *(LABELS[t] for t in PPL_TASKS), *(LABELS[t] for t in ZERO_SHOT)]
    header += ["avg acc", "search"]
    lines = [
        "# Quality: MultiPruner against the baselines, same data, same extraction, same evaluation",
        "",
        f"Produced by `benchmarks/quality.py`; the raw numbers are in `{Path(args.json).name}`.",
        "",
    ]
    for model in sorted({c["model"] for c in cells}):
        lines += [f"## {model}", "", render_table(header, table_rows(cells, model), markdown=True), ""]
    lines += ["![perplexity vs ratio](img/quality-perplexity.png)", ""]
    atomic_write_text(Path(args.markdown), "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"also: {', '.join(VARIANTS)} (default: %(default)s)"
    )
    parser.add_argument("--ratios", default="10,20")
    parser.add_argument("--runs", default="runs/quality", help="run directories of the searches")
    parser.add_argument("--json", default="docs/quality.json")
    parser.add_argument("--markdown", default="docs/quality-table.md")
    parser.add_argument("--figure", default="docs/img/quality-perplexity.png")
    parser.add_argument(
        "--limit", type=int, default=200, help="examples per zero-shot task (the same everywhere)"
    )
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument(
        "--max-windows", type=int, default=None, help="perplexity windows per text (default all)"
    )
    parser.add_argument(
        "--search-overrides",
        default="{}",
        help='JSON: per-model SearchSettings fields, e.g. {"gemma3-270m": {...}}',
    )
    parser.add_argument(
        "--reuse",
        action="append",
        default=[],
        metavar="CELL=RUN_DIR",
        help="evaluate a finished run directory as this cell instead of searching, "
        "e.g. smollm2-135m/multipruner/10=runs/smollm2-135m-10pct",
    )
    parser.add_argument(
        "--tasks",
        default=",".join((*PPL_TASKS, *ZERO_SHOT)),
        help="what to evaluate; a cell that already has some of them is evaluated on the others only",
    )
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    args.tasks_requested = [t for t in args.tasks.split(",") if t]
    args.tasks = args.tasks_requested
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    path = Path(args.json)
    cells = json.loads(path.read_text()) if path.is_file() else {}
    if not args.table_only:
        for model in args.models.split(","):
            jobs = [(model, "dense", None)] + [
                (model, method, float(r))
                for r in args.ratios.split(",")
                for method in args.methods.split(",")
            ]
            for model_name, method, ratio in jobs:
                key = cell_key(model_name, method, ratio)
                wanted = args.tasks_requested
                done = set(cells[key]["eval"]["tasks"]) if key in cells else set()
                args.tasks = [t for t in wanted if t not in done]
                if not args.tasks:
                    continue
                started = time.perf_counter()
                log.info("cell %s: %s", key, ", ".join(args.tasks))
                if method == "dense":
                    cell = run_dense(args, model_name)
                elif method in DERIVED:
                    cell = run_derived(args, model_name, ratio, method)
                else:
                    cell = run_cell(args, model_name, method, ratio)
                cell["wall_s"] = time.perf_counter() - started
                cell["eval_settings"] = dataclasses.asdict(eval_settings(args))
                if key in cells:  # more tasks for a cell: keep what it had, add the new ones
                    old = cells[key]
                    old["eval"]["tasks"].update(cell["eval"]["tasks"])
                    old["commands"] += cell["commands"][-1:]
                    old["wall_s"] = old.get("wall_s", 0.0) + cell["wall_s"]
                    cell = old
                cells[key] = cell
                atomic_write_text(path, json.dumps(cells, indent=1) + "\n")
                log.info("cell %s done in %.0f min", key, cell["wall_s"] / 60)
    ordered = list(cells.values())
    if ordered:
        plot(ordered, Path(args.figure))
        write_markdown(ordered, args)


if __name__ == "__main__":
    main()
