"""How well models fit a run's own calibration sets, sequence by sequence: in-sample against out-of-sample.

The search picks every step on the lowest perplexity of one calibration set (blocks on the block set,
channels and heads on the width set). A plan that fits its width set but not the block set (or one
source of text but not another) overfits. This prints each model's perplexity on every calibration
sequence of a run (named by its first words) and on each whole set, computed as the search does (the
exponential of the mean of per-sequence mean NLLs).

    .venv/bin/python benchmarks/calibration_fit.py RUN_DIR gemma3-270m runs/a/model runs/b/model
"""

from __future__ import annotations

import argparse
import math

import torch

from multipruner.evaluation.perplexity import stream_perplexity
from multipruner.models import load_model
from multipruner.run.run_dir import RunDirectory
from multipruner.search.objective import ignored_label, perplexity_from_nll
from multipruner.tables import render_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run directory (its calibration.safetensors is read)")
    parser.add_argument(
        "models", nargs="+", help="short names, model directories (dense or pruned) or .gguf files"
    )
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    sets = RunDirectory(args.run).load_calibration()
    if not sets:
        parser.error(f"{args.run} holds no calibration.safetensors")
    labels: list[str] = []  # one per table row, filled from the first model's tokenizer
    columns = []
    for spec in args.models:
        model, tokenizer = load_model(spec)
        ignore = ignored_label(tokenizer)
        column = []
        for name, tokens in sets.items():
            logs = []  # each sequence's mean NLL
            for row in tokens:
                ppl = stream_perplexity(model, row, seqlen=row.numel(), ignore_index=ignore, progress=False)
                logs.append(math.log(ppl))
                column.append(f"{ppl:.1f}")
                if not columns:
                    words = tokenizer.decode(row[:16], skip_special_tokens=True).split()
                    labels.append(f"{name}: {' '.join(words[:6])} …")
            column.append(f"{perplexity_from_nll(torch.tensor(logs)):.1f}")
            if not columns:
                labels.append(f"{name} set, all")
        columns.append(column)
        del model
    rows = [[label, *(column[i] for column in columns)] for i, label in enumerate(labels)]
    print(render_table(["calibration sequence", *args.models], rows, markdown=args.markdown))


if __name__ == "__main__":
    main()
