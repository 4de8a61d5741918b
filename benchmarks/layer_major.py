"""Layer-major scoring vs candidate by candidate, on one step of a real model, timed side by side.

Scores step 0 of the block stage and of the MLP-width stage (racing off, so both ways run every
candidate on every batch) with ``layer_major_budget_mb`` 0 (one candidate at a time) and each
``--budgets`` value, in alternation for ``--repeats`` rounds, and checks that the perplexities agree.

    .venv/bin/python benchmarks/layer_major.py [--model smollm2-135m] [--device cpu] [--budgets 256,1024]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from multipruner.core.reorder import reorder_weights
from multipruner.core.surgery import PrunableModel
from multipruner.models import load_model, resolve_device
from multipruner.search.calibration import CalibrationSettings
from multipruner.search.loop import initial_plan
from multipruner.search.objective import LossSettings, ignored_label
from multipruner.search.scoring import CalibrationScorer
from multipruner.search.settings import SearchSettings
from multipruner.search.stages import block_candidates, width_candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--budgets", default="256,1024", help="layer_major_budget_mb values to compare with 0"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", default="block,mlp_width", help="which stages' step 0 to time")
    args = parser.parse_args()

    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    reorder_weights(model)
    prunable = PrunableModel(model)
    sets = CalibrationSettings().build(tokenizer)  # the defaults: 2,048 + 1,024 tokens of the mix
    settings = SearchSettings(
        target_ratio=10.0, distribution=(44, 52, 4), mlp_group_size=128, attention_group_size=192
    ).resolved(prunable.layout)
    plan = initial_plan(prunable.layout, settings)
    steps = {
        "block": (sets["block"], block_candidates(plan, settings)),
        "mlp_width": (sets["width"], width_candidates("mlp")(plan, settings)),
    }
    budgets = [0.0] + [float(b) for b in args.budgets.split(",")]
    print(f"{args.model} {args.dtype} on {device}, {torch.get_num_threads()} threads")
    for name in args.steps.split(","):
        tokens, candidates = steps[name]
        plans = [c.apply(plan) for c in candidates]
        times: dict[float, list[float]] = {b: [] for b in budgets}
        ppl: dict[float, list[float]] = {}
        for _ in range(args.repeats):
            for budget in budgets:
                loss = LossSettings(ignore_index=ignored_label(tokenizer), layer_major_budget_mb=budget)
                scorer = CalibrationScorer(prunable, tokens, replace(loss, reuse_budget_mb=0), device)
                started = time.perf_counter()
                scores = scorer.score(plans, [c.layer for c in candidates])
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[budget].append(time.perf_counter() - started)
                ppl[budget] = scores.ppl
        base = statistics.median(times[0.0])
        print(f"{name} step 0: {len(candidates)} candidates, {tuple(tokens.shape)} tokens")
        for budget in budgets:
            t = statistics.median(times[budget])
            worst = max(abs(a / b - 1) for a, b in zip(ppl[budget], ppl[0.0], strict=True))
            label = "candidate by candidate" if budget == 0 else f"layer-major, {budget:g} MB"
            print(f"  {label:>24}: {t:7.1f} s  ({base / t:.2f}x)  max rel. ppl diff {worst:.1e}")


if __name__ == "__main__":
    main()
