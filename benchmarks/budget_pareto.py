"""Held-out perplexity against measured decode latency and against parameters, one point per pruned model.

Each point is a plan with its held-out evaluation (``multipruner eval --output``); the dense model is a
point too. Every plan is extracted from a fresh copy of the dense model and all models are timed on one
workload (``decode``: one token after ``--context`` tokens, batch ``--batch-size``; search/latency.py's
timer, the one a latency budget is searched and benched with), in turn, repeat by repeat, medians kept.

    .venv/bin/python benchmarks/budget_pareto.py --model smollm2-135m \\
        --dense-eval runs/dense.eval.json \\
        --point "staged 44:52:4=runs/staged/plan.json:runs/staged.eval.json" \\
        --point "auto=runs/auto/plan.json:runs/auto.eval.json" --out docs/budget-pareto

Writes ``OUT.json`` (every point's numbers) and ``OUT.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from multipruner import PrunableModel  # noqa: E402
from multipruner.core.extract import extract  # noqa: E402
from multipruner.core.layout import layout_of  # noqa: E402
from multipruner.core.plan import load_plan  # noqa: E402
from multipruner.evaluation.model_size import count_params  # noqa: E402
from multipruner.models import load_model  # noqa: E402
from multipruner.search.latency import workload_timer  # noqa: E402


def _point(text: str) -> tuple[str, Path, Path]:
    name, _, paths = text.partition("=")
    plan, _, evaluation = paths.rpartition(":")
    if not name or not plan or not evaluation:
        raise argparse.ArgumentTypeError(f"--point takes NAME=PLAN:EVAL_JSON, got {text!r}")
    return name, Path(plan), Path(evaluation)


def _perplexities(path: Path) -> dict[str, float]:
    tasks = json.loads(path.read_text())["tasks"]
    return {task: metrics["ppl"]["value"] for task, metrics in tasks.items() if "ppl" in metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dense-eval", type=Path, required=True)
    parser.add_argument("--point", type=_point, action="append", required=True)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("docs/budget-pareto"))
    args = parser.parse_args()

    models = {}
    dense, _ = load_model(args.model)
    models["dense"] = dense
    for name, plan_path, _ in args.point:
        fresh, _ = load_model(args.model)
        plan = load_plan(plan_path, layout_of(fresh))
        models[name] = extract(PrunableModel.from_plan(fresh, plan), plan)
    timers = {name: workload_timer(m, "decode", args.batch_size, args.context) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, run in timers.items():
            times[name].append(run())
    evals = {"dense": args.dense_eval, **{name: path for name, _, path in args.point}}
    points = {
        name: {
            "decode_ms": 1e3 * statistics.median(times[name]),
            "params": count_params(models[name]),
            "ppl": _perplexities(evals[name]),
        }
        for name in models
    }
    for point in points.values():
        point["decode_speedup"] = points["dense"]["decode_ms"] / point["decode_ms"]
    workload = {"workload": "decode", "batch_size": args.batch_size, "context": args.context}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"model": args.model, **workload, "repeats": args.repeats, "points": points}, indent=2)
        + "\n"
    )
    tasks = [t for t in ("wikitext2", "ptb", "hellaswag-text") if all(t in p["ppl"] for p in points.values())]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 3.4 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        for col, (key, label) in enumerate((("decode_ms", "decode ms/token"), ("params", "parameters"))):
            ax = axes[row][col]
            for name, point in points.items():
                x = point[key] / (1e6 if key == "params" else 1)
                ax.scatter(x, point["ppl"][task], color="black" if name == "dense" else None)
                ax.annotate(
                    name, (x, point["ppl"][task]), fontsize=8, xytext=(4, 3), textcoords="offset points"
                )
            ax.set_xlabel(
                label + (" (M)" if key == "params" else f", batch {args.batch_size}, context {args.context}")
            )
            ax.set_ylabel(f"{task} perplexity")
            ax.grid(alpha=0.3)
    fig.suptitle(f"{args.model}: held-out perplexity against measured decode latency and size")
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    for name, point in points.items():
        ppl = ", ".join(f"{t} {point['ppl'][t]:.2f}" for t in tasks)
        print(
            f"{name:28s} {point['decode_ms']:7.2f} ms ({point['decode_speedup']:.3f}x)  {point['params'] / 1e6:7.2f}M  {ppl}"
        )


if __name__ == "__main__":
    main()
