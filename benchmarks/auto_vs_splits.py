"""``--distribution auto`` against fixed splits: held-out perplexity and search time, one cell per model,
ratio and split (issue 28's table).

Each cell runs ``multipruner prune`` (search only, resumable) into ``RUNS/<model>-<ratio>-<split>`` and
evaluates the plain pruned plan on WikiText-2 test, PTB test and hellaswag-text (an out-of-domain text
no calibration source holds), first ``--max-windows`` windows of 2,048 tokens. A cell is written to the
JSON as soon as it finishes and is not recomputed while it is there. The search time is the sum of the
steps' times (steps.jsonl), so a resumed search counts only its work.

    .venv/bin/python benchmarks/auto_vs_splits.py --models smollm2-135m --ratios 10 \\
        --splits auto,44:52:4,30:65:5,60:35:5,20:75:5,0:95:5 --out docs/auto-splits.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from multipruner.cli import main as cli
from multipruner.io_utils import atomic_write_text
from multipruner.tables import render_table

TASKS = ("wikitext2", "ptb", "hellaswag-text")


def _cell(model: str, ratio: str, split: str, args: argparse.Namespace) -> dict:
    run = args.runs / f"{Path(model).name}-{ratio}-{split.replace(':', '_')}"
    flags = [
        "--mlp-group-size",
        str(args.mlp_group_size),
        "--attention-group-size",
        str(args.attention_group_size),
    ]
    prune = [
        "prune",
        "--model",
        model,
        "--output-path",
        str(run),
        "--target-ratio",
        ratio,
        "--distribution",
        split,
    ]
    if cli([*prune, *flags, "--no-report", *(["--resume"] if run.exists() else [])]) != 0:
        raise SystemExit(f"the search of {run} failed")
    evaluation = run.with_suffix(".eval.json")
    if not evaluation.exists():
        tasks = ",".join(TASKS)
        plan = str(run / "plan.json")
        window = ["--max-windows", str(args.max_windows)]
        if (
            cli(
                [
                    "eval",
                    "--model",
                    model,
                    "--plan",
                    plan,
                    "--tasks",
                    tasks,
                    *window,
                    "--output",
                    str(evaluation),
                ]
            )
            != 0
        ):
            raise SystemExit(f"the evaluation of {run} failed")
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()][1:]
    ppl = {t: m["ppl"]["value"] for t, m in json.loads(evaluation.read_text())["tasks"].items() if "ppl" in m}
    kinds: dict[str, int] = {}
    for step in steps:
        name = f"{step['choice']['op']} {step['choice']['kind']}"
        kinds[name] = kinds.get(name, 0) + 1
    return {
        "model": model,
        "ratio": float(ratio),
        "split": split,
        "steps": len(steps),
        "moves": kinds,
        "removed_percent": steps[-1]["ratio"] if steps else 0.0,
        "search_s": sum(step["elapsed_s"] for step in steps),
        "ppl": ppl,
    }


def _table(cells: dict, markdown: bool = False) -> str:
    rows = [
        [
            c["model"],
            f"{c['ratio']:g} %",
            c["split"],
            str(c["steps"]),
            f"{c['removed_percent']:.2f} %",
            f"{c['search_s']:,.0f} s",
            *(f"{c['ppl'].get(t, float('nan')):.2f}" for t in TASKS),
        ]
        for c in cells.values()
    ]
    header = ["model", "target", "split", "steps", "removed", "search", *TASKS]
    return render_table(header, rows, markdown=markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2-135m")
    parser.add_argument("--ratios", default="10")
    parser.add_argument("--splits", default="auto,44:52:4")
    parser.add_argument("--mlp-group-size", type=int, default=256)
    parser.add_argument("--attention-group-size", type=int, default=192)
    parser.add_argument("--max-windows", type=int, default=32)
    parser.add_argument("--runs", type=Path, default=Path("runs/auto-splits"))
    parser.add_argument("--out", type=Path, default=Path("docs/auto-splits.json"))
    args = parser.parse_args()
    cells = json.loads(args.out.read_text()) if args.out.exists() else {}
    for model in args.models.split(","):
        for ratio in args.ratios.split(","):
            for split in args.splits.split(","):
                key = f"{model}/{ratio}/{split}"
                if key not in cells:
                    cells[key] = _cell(model, ratio, split, args)
                    atomic_write_text(args.out, json.dumps(cells, indent=2) + "\n")
    atomic_write_text(args.out.with_suffix(".md"), _table(cells, markdown=True) + "\n")
    print(_table(cells))


if __name__ == "__main__":
    main()
