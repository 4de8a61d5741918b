"""Does a calibration set pick the candidate that is best on text the search never sees? At what size?

For one search step (a block step on the dense model, and an MLP-width step at the start of the width
stage of the reference run's plan), every candidate is scored once, per sequence, on large pools of
each calibration corpus and on held-out text (WikiText-2 test + PTB test). Then, for each corpus and
token budget, random subsets of the pool play the calibration set: the candidate each subset picks is
charged its *held-out regret*, the held-out NLL of the pick minus that of the held-out best (0 is a
perfect pick). Mean regret over many draws, per budget, shows how much text a choice needs and which
corpus generalises. One scoring pass per pool serves every budget.

    .venv/bin/python benchmarks/ranking_study.py --out runs/ranking-study.json
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import torch

from multipruner.core.plan import PruningPlan
from multipruner.core.surgery import PrunableModel
from multipruner.data import eval_token_stream
from multipruner.io_utils import atomic_write_text
from multipruner.models import load_model
from multipruner.search.calibration import draw_tokens
from multipruner.search.loop import initial_plan
from multipruner.search.objective import LossSettings, ignored_label
from multipruner.search.racing import RaceSettings
from multipruner.search.scoring import CalibrationScorer
from multipruner.search.settings import SearchSettings
from multipruner.search.stages import block_candidates, width_candidates

log = logging.getLogger("ranking_study")

# the reference run's block stage (blocks-stage end of the old main job), from which the width stage starts
REFERENCE_BLOCKS = {"pruned_attn_idx": [5, 7, 17, 26, 29], "pruned_mlp_idx": [17]}


def held_out_tokens(tokenizer, seqlen: int, per_text: int) -> torch.Tensor:
    rows = []
    for source in ("wikitext2", "ptb"):
        stream = eval_token_stream(source, tokenizer)
        n = min(per_text, stream.numel() // seqlen)
        rows.append(stream[: n * seqlen].view(n, seqlen))
    return torch.cat(rows)


def score_pool(prunable, plan, candidates, tokens, ignore) -> torch.Tensor:
    """[candidates, sequences] mean NLL per sequence."""
    scorer = CalibrationScorer(
        prunable, tokens, LossSettings(ignore_index=ignore, batch_size=2, reuse_budget_mb=0)
    )
    prunable.apply(plan)
    scores = scorer.score(
        [c.apply(plan) for c in candidates], [c.layer for c in candidates], race=RaceSettings("off")
    )
    return torch.stack(scores.sequence_nll).double()


def regret_curve(pool: torch.Tensor, held: torch.Tensor, seqlen: int, budgets, draws: int, seed: int) -> dict:
    truth = held.mean(dim=1)
    best = truth.min().item()
    rng = random.Random(seed)
    curve = {}
    for budget in budgets:
        n = budget // seqlen
        if n < 1 or n > pool.shape[1]:
            continue
        regrets, hits = [], 0
        for _ in range(draws):
            subset = rng.sample(range(pool.shape[1]), n)
            pick = int(pool[:, subset].mean(dim=1).argmin())
            regrets.append(truth[pick].item() - best)
            hits += int(truth[pick].item() == best)
        curve[budget] = {"mean_regret_nll": sum(regrets) / draws, "best_pick_rate": hits / draws}
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default="runs/ranking-study.json")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--pool-tokens", type=int, default=16384)
    parser.add_argument("--held-out-per-text", type=int, default=16, help="held-out sequences per text")
    parser.add_argument("--corpora", default="piqa,wikitext2+ptb+piqa")
    parser.add_argument("--steps", default="width,block")
    parser.add_argument("--draws", type=int, default=400)
    parser.add_argument(
        "--after-blocks",
        type=json.loads,
        default=REFERENCE_BLOCKS,
        help='the block stage the width step starts from, e.g. \'{"pruned_attn_idx": [7, 8], "pruned_mlp_idx": [6]}\' '
        "(default: the old SmolLM2 main job's)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    model, tokenizer = load_model(args.model)
    prunable = PrunableModel.prepare(model, weight_reorder=True)
    layout = prunable.layout
    settings = SearchSettings().resolved(layout)  # the model's group sizes (SmolLM2: 128 channels, 3 heads)
    dense = initial_plan(layout, settings)
    after_blocks = PruningPlan.from_reference(args.after_blocks, layout)
    steps = {
        "width": (after_blocks, width_candidates("mlp")(after_blocks, settings)),
        "block": (dense, block_candidates(dense, settings)),
    }
    pools = {
        corpus: draw_tokens(corpus, tokenizer, tokens=args.pool_tokens, seqlen=args.seqlen, seed=7)
        for corpus in args.corpora.split(",")
    }
    held = held_out_tokens(tokenizer, args.seqlen, args.held_out_per_text)
    budgets = [512, 1024, 2048, 4096, 8192, 16384]
    result = {
        "seqlen": args.seqlen,
        "pool_tokens": args.pool_tokens,
        "held_out_sequences": held.shape[0],
        "steps": {},
    }
    for name in args.steps.split(","):
        plan, candidates = steps[name]
        started = time.perf_counter()
        held_nll = score_pool(prunable, plan, candidates, held, ignored_label(tokenizer))
        entry = {
            "candidates": [c.to_dict() for c in candidates],
            "held_out_nll": held_nll.mean(dim=1).tolist(),
            "corpora": {},
        }
        for corpus, tokens in pools.items():
            pool = score_pool(prunable, plan, candidates, tokens, ignored_label(tokenizer))
            full_pick = int(pool.mean(dim=1).argmin())
            entry["corpora"][corpus] = {
                "pool_nll": pool.mean(dim=1).tolist(),
                "regret": regret_curve(pool, held_nll, args.seqlen, budgets, args.draws, seed=11),
                "full_pool_regret_nll": held_nll.mean(dim=1)[full_pick].item()
                - held_nll.mean(dim=1).min().item(),
            }
            log.info("%s step, %s: %s", name, corpus, json.dumps(entry["corpora"][corpus]["regret"]))
        entry["seconds"] = time.perf_counter() - started
        result["steps"][name] = entry
        atomic_write_text(Path(args.out), json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
