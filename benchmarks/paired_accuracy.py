"""Zero-shot accuracy of several models on the same examples, each compared pairwise with the first.

Two accuracies of ±5 points each (100 examples) cannot tell a 4-point gap from noise, but the models
answer the *same* questions, and most questions both get right or both get wrong. The paired
difference (per example: this model's score minus the first model's) has a much smaller standard
error; this prints it per task and for the mean over the tasks, beside each model's own accuracy.
Scores are each task's headline metric (acc_norm where it has one, else acc), as `multipruner eval`.

    .venv/bin/python benchmarks/paired_accuracy.py runs/shortgpt/model runs/multipruner/model --limit 300
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from multipruner.evaluation.zeroshot import example_scores
from multipruner.models import load_model
from multipruner.tables import render_table

TASKS = "piqa,arc_easy,hellaswag,boolq,openbookqa"


def standard_error(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def summary(samples: dict[str, list[float]]) -> dict:
    """Per task: the mean of its samples and its standard error; and the mean over the tasks, whose
    error adds the tasks' variances (they are independent samples)."""
    rows = {task: (statistics.fmean(values), standard_error(values)) for task, values in samples.items()}
    count = len(rows)
    mean = sum(m for m, _ in rows.values()) / count
    return {"tasks": rows, "mean": (mean, math.sqrt(sum(e * e for _, e in rows.values())) / count)}


def paired_samples(
    first: dict[str, dict[int, float]], other: dict[str, dict[int, float]]
) -> dict[str, list[float]]:
    """Per task and example: the other model's score minus the first's, on the same document."""
    return {
        task: [other[task][doc] - score for doc, score in reference.items()]
        for task, reference in first.items()
    }


def _points(value: tuple[float, float], signed: bool = False) -> str:
    return f"{100 * value[0]:{'+' if signed else ''}.1f} ± {100 * value[1]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "models", nargs="+", help="short names, model directories or .gguf files; the first is the reference"
    )
    parser.add_argument("--tasks", default=TASKS)
    parser.add_argument(
        "--limit", type=int, default=100, help="examples per task (the first N, as eval's --limit)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every per-example score here")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    if len(args.models) < 2:
        parser.error("give at least two models: the reference first, then those compared with it")
    scores = {}
    for spec in args.models:
        model, tokenizer = load_model(spec)
        scores[spec] = example_scores(model, tokenizer, args.tasks.split(","), limit=args.limit)
        del model
    tasks = list(scores[args.models[0]])
    header = ["model", *tasks, "mean"]
    rows = []
    for spec in args.models:
        own = summary({task: list(values.values()) for task, values in scores[spec].items()})
        rows.append([spec, *(_points(own["tasks"][t]) for t in tasks), _points(own["mean"])])
    for spec in args.models[1:]:
        gap = summary(paired_samples(scores[args.models[0]], scores[spec]))
        rows.append(
            [
                f"{spec} − first (paired)",
                *(_points(gap["tasks"][t], True) for t in tasks),
                _points(gap["mean"], True),
            ]
        )
    print(f"accuracy (%) on the first {args.limit} examples per task, ± one standard error")
    print(render_table(header, rows, markdown=args.markdown))
    if args.json:
        args.json.write_text(json.dumps({"limit": args.limit, "scores": scores}) + "\n")


if __name__ == "__main__":
    main()
