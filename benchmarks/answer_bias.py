"""Which answer each model picks on a multiple-choice task, beside the gold answers' shares.

An accuracy near chance can hide a model that gives one answer to everything: on BoolQ it then scores
the share of that answer among the gold labels, whatever it knows. This prints, per model, how often it
picks each choice position (the ``acc`` rule: the highest log-likelihood) and how often each is gold.

    .venv/bin/python benchmarks/answer_bias.py gemma3-270m runs/x/model --task boolq --limit 100
"""

from __future__ import annotations

import argparse

from multipruner.evaluation.zeroshot import answer_counts
from multipruner.models import load_model
from multipruner.tables import render_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "models", nargs="+", help="short names, model directories (dense or pruned) or .gguf files"
    )
    parser.add_argument("--task", default="boolq")
    parser.add_argument(
        "--limit", type=int, default=100, help="examples scored (the first N, as eval's --limit)"
    )
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    rows, header = [], None
    for spec in args.models:
        model, tokenizer = load_model(spec)
        counts = answer_counts(model, tokenizer, args.task, limit=args.limit)
        n = counts.examples
        if header is None:
            names = counts.choices
            header = ["model", "accuracy", *(f"picks {c}" for c in names), *(f"gold {c}" for c in names)]
        rows.append(
            [
                spec,
                f"{100 * counts.correct / n:.0f} %",
                *(f"{100 * k / n:.0f} %" for k in counts.picked),
                *(f"{100 * k / n:.0f} %" for k in counts.gold),
            ]
        )
        del model
    print(f"{args.task}, first {args.limit} examples")
    print(render_table(header, rows, markdown=args.markdown))


if __name__ == "__main__":
    main()
