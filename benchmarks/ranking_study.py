"""Does a step pick the candidate that is best on text the search never sees, and at what compute?

For one block step (on the dense model) and one MLP-width step (at the start of the width stage of a
given block plan), every candidate is scored once, per sequence, on a large pool of calibration text
(by NLL and by KL to the dense model) and on held-out text (WikiText-2 test, PTB test, and text from a
domain no calibration source holds: HellaSwag's contexts). Then random subsets of the pool play the
calibration set, under each way of spending compute:

* ``exact n``: every candidate on n tokens (today's search);
* ``screen s -> K -> n``: every candidate on the first s tokens of an n-token set, the best K on all n
  (what ``--screen-tokens s --finalists K`` does, the decision set being the stage's n tokens);
* ``proxy K -> n`` (width steps): candidates ranked by the share of branch output their dropped channels
  carry (``--width-screen proxy``, measured on the run's 1,024-token width set), the best K on n tokens;
* each with ``--objective nll`` or ``kl``.

Each pick is charged its *held-out regret*: the held-out NLL of the pick minus that of the held-out
best (0: a perfect pick). Compute is counted in candidate-layer-tokens (a candidate's tail runs from its
layer to the last) and converted to seconds with the pool pass's measured rate. The scoring pass is
cached (``<out>.pt``), so the analysis and the figure rerun in seconds.

    .venv/bin/python benchmarks/ranking_study.py --out runs/ranking-study.json --figure docs/img/ranking-study.png
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import replace
from pathlib import Path

import torch

from multipruner.core.importance import CHANNEL_IMPORTANCE
from multipruner.core.plan import PruningPlan
from multipruner.core.surgery import PrunableModel
from multipruner.data import eval_token_stream
from multipruner.io_utils import atomic_write_text
from multipruner.models import load_model
from multipruner.search.calibration import DEFAULT_SOURCE, SetSize, build_calibration_sets, draw_tokens
from multipruner.search.kl_objective import DenseTargets, KlObjective
from multipruner.search.loop import initial_plan
from multipruner.search.objective import LossSettings, NllObjective, ignored_label
from multipruner.search.racing import RaceSettings
from multipruner.search.scoring import CalibrationScorer
from multipruner.search.screening import FinalistRule, width_proxy_scores
from multipruner.search.settings import SearchSettings
from multipruner.search.stages import block_candidates, width_candidates

log = logging.getLogger("ranking_study")

# the reference run's block stage (blocks-stage end of the old main job), from which the width stage starts
REFERENCE_BLOCKS = {"pruned_attn_idx": [5, 7, 17, 26, 29], "pruned_mlp_idx": [17]}
HELD_OUT_TEXTS = ("wikitext2", "ptb", "hellaswag-text")
TODAY = {"block": 2048, "width": 1024}  # the defaults' token budgets, the reference points


def held_out_tokens(tokenizer, seqlen: int, per_text: int) -> dict[str, torch.Tensor]:
    out = {}
    for source in HELD_OUT_TEXTS:
        stream = eval_token_stream(source, tokenizer)
        n = min(per_text, stream.numel() // seqlen)
        out[source] = stream[: n * seqlen].view(n, seqlen)
    return out


class NllAndKl:
    """Scores by NLL and keeps each call's KL beside it: one tail pass gives both objectives."""

    def __init__(self, nll: NllObjective, kl: KlObjective):
        self.nll, self.kl, self.kl_calls = nll, kl, []

    def per_sequence(self, normed, ids, rows):
        self.kl_calls.append(self.kl.per_sequence(normed, ids, rows))
        return self.nll.per_sequence(normed, ids, rows)

    def lower_bound(self, current, ids, rows):
        return None


def score_pool(prunable, plan, candidates, tokens, loss, kl_targets=None) -> dict:
    """Per-sequence NLL [candidates, sequences] (and KL, with ``kl_targets``), and the seconds it took."""
    nll = NllObjective(prunable.model, prunable.adapter, loss)
    objective = (
        nll
        if kl_targets is None
        else NllAndKl(nll, KlObjective(prunable.model, prunable.adapter, loss, kl_targets))
    )
    scorer = CalibrationScorer(prunable, tokens, loss, objective=objective)
    prunable.apply(plan)
    started = time.perf_counter()
    scores = scorer.score(
        [c.apply(plan) for c in candidates], [c.layer for c in candidates], race=RaceSettings("off")
    )
    out = {"nll": torch.stack(scores.sequence_nll).double(), "seconds": time.perf_counter() - started}
    if kl_targets is not None:  # calls come batch by batch, candidates in order within each
        n = len(candidates)
        calls = objective.kl_calls
        out["kl"] = torch.stack(
            [torch.cat([calls[b * n + k] for b in range(len(calls) // n)]) for k in range(n)]
        ).double()
    return out


def measure(args) -> dict:
    """The expensive pass: every candidate of both steps on the pool and the held-out texts."""
    model, tokenizer = load_model(args.model)
    loss = LossSettings(ignore_index=ignored_label(tokenizer), batch_size=2, reuse_budget_mb=0)
    calibration = build_calibration_sets(  # the run's default calibration: orders channels, runs the proxy
        DEFAULT_SOURCE, tokenizer, block=SetSize(tokens=2048), width=SetSize(tokens=1024), seqlen=args.seqlen
    )
    order = CHANNEL_IMPORTANCE["activations"].order(model, calibration, 2)
    prunable = PrunableModel.prepare(model, weight_reorder=True, channel_order=order)
    layout = prunable.layout
    settings = SearchSettings().resolved(layout)
    dense = initial_plan(layout, settings, order)
    blocks = PruningPlan.from_reference(args.after_blocks, layout)
    after_blocks = replace(dense, removed_attention=blocks.removed_attention, removed_mlp=blocks.removed_mlp)
    steps = {
        "width": (after_blocks, width_candidates("mlp")(after_blocks, settings)),
        "block": (dense, block_candidates(dense, settings)),
    }
    pool = draw_tokens(DEFAULT_SOURCE, tokenizer, tokens=args.pool_tokens, seqlen=args.seqlen, seed=7)
    held = held_out_tokens(tokenizer, args.seqlen, args.held_out_per_text)
    prunable.apply(dense)
    targets = DenseTargets.compute(
        model, prunable.adapter, pool, top_k=args.kl_top_k, batch_size=2, chunk_tokens=loss.chunk_tokens
    )
    data = {"seqlen": args.seqlen, "num_layers": layout.num_layers, "steps": {}}
    for name in args.steps.split(","):
        plan, candidates = steps[name]
        entry = {"candidates": [c.to_dict() for c in candidates]}
        scored = score_pool(prunable, plan, candidates, pool, loss, targets)
        entry |= {"pool_nll": scored["nll"], "pool_kl": scored["kl"], "pool_seconds": scored["seconds"]}
        for text, tokens in held.items():
            entry[f"held_{text}"] = score_pool(prunable, plan, candidates, tokens, loss)["nll"]
            log.info("%s step: %s scored", name, text)
        if name == "width":
            prunable.apply(plan)
            entry["proxy"] = torch.cat(
                width_proxy_scores(prunable, candidates, calibration["width"], 2, torch.device("cpu"))
            ).double()
        data["steps"][name] = entry
        log.info("%s step: %d candidates scored in %.0fs", name, len(candidates), scored["seconds"])
        torch.save(data, args.cache)
    return data


def tail_layers(candidates: list[dict], num_layers: int) -> torch.Tensor:
    return torch.tensor([num_layers - c["layer"] for c in candidates], dtype=torch.float64)


def strategies(step: str) -> list[dict]:
    """Every setting the study simulates: exact budgets, screen -> decide, and (width) the proxy."""
    out = []
    for objective in ("nll", "kl"):
        out += [{"kind": "exact", "decide": n, "objective": objective} for n in (512, 1024, 2048, 4096, 8192)]
        for screen in (512, 1024, 2048):
            for k in (2, 3, 4, 6):
                for decide in (4096, 8192):
                    out.append(
                        {"kind": "screen", "screen": screen, "k": k, "decide": decide, "objective": objective}
                    )
        for margin in (0.005, 0.01, 0.02):
            out.append(
                {
                    "kind": "screen",
                    "screen": 1024,
                    "k": 1,
                    "margin": margin,
                    "decide": 8192,
                    "objective": objective,
                }
            )
        if step == "width":
            for k in (2, 3, 4, 6, 8):
                for decide in (2048, 4096, 8192):
                    out.append({"kind": "proxy", "k": k, "decide": decide, "objective": objective})
    return out


def label(s: dict) -> str:
    obj = "" if s["objective"] == "nll" else " kl"
    if s["kind"] == "exact":
        return f"exact {s['decide']}{obj}"
    first = "proxy" if s["kind"] == "proxy" else f"screen {s['screen']}"
    k = f"margin {s['margin']}" if s.get("margin") else f"K={s['k']}"
    return f"{first} -> {k} -> {s['decide']}{obj}"


def simulate(entry: dict, s: dict, seqlen: int, num_layers: int, draws: int, seed: int) -> dict:
    """Mean held-out regret (all held-out texts, and each) and compute of one strategy over random draws."""
    pool = entry["pool_nll"] if s["objective"] == "nll" else entry["pool_kl"]
    n_pool = pool.shape[1]
    n_decide = s["decide"] // seqlen
    if n_decide > n_pool:
        return {}
    tails = tail_layers(entry["candidates"], num_layers)
    held = {t: entry[f"held_{t}"].mean(dim=1) for t in HELD_OUT_TEXTS}
    held["all"] = torch.cat([entry[f"held_{t}"] for t in HELD_OUT_TEXTS], dim=1).mean(dim=1)
    rng = random.Random(seed)
    regret = {t: 0.0 for t in held}
    recall = 0
    layer_tokens = 0.0
    for _ in range(draws):
        rows = rng.sample(range(n_pool), n_decide)
        decide = pool[:, rows].mean(dim=1)
        if s["kind"] == "exact":
            finalists = list(range(pool.shape[0]))
            layer_tokens += tails.sum().item() * s["decide"]
        else:
            if s["kind"] == "proxy":
                screen = [entry["proxy"][k : k + 1] for k in range(pool.shape[0])]
                layer_tokens += num_layers * 1024
            else:
                first = rows[: s["screen"] // seqlen]
                screen = [pool[k, first] for k in range(pool.shape[0])]
                layer_tokens += tails.sum().item() * s["screen"]
            finalists = FinalistRule(s["k"], s.get("margin", 0.0)).pick(screen)
            layer_tokens += tails[finalists].sum().item() * s["decide"]
        pick = min(finalists, key=lambda k: (decide[k].item(), k))
        recall += int(int(held["all"].argmin()) in finalists)
        for t, truth in held.items():
            regret[t] += truth[pick].item() - truth.min().item()
    return {
        "label": label(s),
        **s,
        "regret": {t: v / draws for t, v in regret.items()},
        "held_out_best_in_finalists": recall / draws,
        "layer_tokens": layer_tokens / draws,
    }


def analyse(data: dict, draws: int) -> dict:
    result = {"seqlen": data["seqlen"], "steps": {}}
    for name, entry in data["steps"].items():
        tails = tail_layers(entry["candidates"], data["num_layers"])
        seconds_per_layer_token = entry["pool_seconds"] / (
            tails.sum().item() * entry["pool_nll"].numel() / len(tails) * data["seqlen"]
        )
        rows = []
        for s in strategies(name):
            row = simulate(entry, s, data["seqlen"], data["num_layers"], draws, seed=11)
            if row:
                row["seconds"] = row["layer_tokens"] * seconds_per_layer_token
                rows.append(row)
        today = next(r for r in rows if r["label"] == f"exact {TODAY[name]}")
        for r in rows:
            r["compute_vs_today"] = r["layer_tokens"] / today["layer_tokens"]
            r["regret_vs_today"] = r["regret"]["all"] / max(today["regret"]["all"], 1e-12)
        if "proxy" in entry:  # the proxy's agreement with forward screening on the whole pool
            forward = entry["pool_nll"].mean(dim=1)
            by_proxy = entry["proxy"].argsort().tolist()
            by_forward = forward.argsort().tolist()
            result.setdefault("proxy_recall", {})[name] = {
                k: len(set(by_proxy[:k]) & set(by_forward[:k])) / k for k in (1, 2, 3, 4, 6, 8)
            }
            result["proxy_recall"][name]["forward_best_in_proxy_top"] = by_proxy.index(by_forward[0]) + 1
        result["steps"][name] = {"seconds_per_candidate_step": entry["pool_seconds"], "rows": rows}
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(result["steps"])
    fig, axes = plt.subplots(1, len(steps), figsize=(6.5 * len(steps), 4.8), squeeze=False)
    styles = {"exact": ("o", "-"), "screen": ("s", ""), "proxy": ("^", "")}
    for ax, name in zip(axes[0], steps, strict=True):
        rows = result["steps"][name]["rows"]
        for kind, (marker, line) in styles.items():
            for objective, color in (
                ("nll", {"exact": "black", "screen": "tab:blue", "proxy": "tab:green"}[kind]),
                ("kl", "tab:red"),
            ):
                pts = sorted(
                    (r["compute_vs_today"], r["regret"]["all"])
                    for r in rows
                    if r["kind"] == kind and r["objective"] == objective
                )
                if not pts:
                    continue
                xs, ys = zip(*pts, strict=True)
                ax.plot(
                    xs,
                    ys,
                    marker=marker,
                    linestyle=line or "none",
                    color=color,
                    alpha=0.8 if kind == "exact" else 0.45,
                    label=f"{kind} ({objective})",
                    markersize=5,
                )
        today = next(r for r in rows if r["label"] == f"exact {TODAY[name]}")
        ax.axhline(
            today["regret"]["all"] / 3,
            color="grey",
            linestyle=":",
            linewidth=1,
            label="1/3 of today's regret",
        )
        ax.axvline(
            1.0, color="grey", linestyle="--", linewidth=1, label=f"today's compute (exact {TODAY[name]})"
        )
        ax.set_xscale("log")
        ax.set_xlabel("compute per step, relative to today's default (candidate-layer-tokens)")
        ax.set_ylabel("mean held-out regret per step (nats)")
        ax.set_title(f"SmolLM2-135M, {name} step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default="runs/ranking-study.json")
    parser.add_argument("--figure", default=None, help="write the regret-against-compute figure here")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--pool-tokens", type=int, default=12288)
    parser.add_argument("--held-out-per-text", type=int, default=6, help="held-out sequences per text")
    parser.add_argument("--steps", default="width,block")
    parser.add_argument("--draws", type=int, default=400)
    parser.add_argument("--kl-top-k", type=int, default=64)
    parser.add_argument(
        "--after-blocks",
        type=json.loads,
        default=REFERENCE_BLOCKS,
        help='the block stage the width step starts from, e.g. \'{"pruned_attn_idx": [7, 8], "pruned_mlp_idx": [6]}\' '
        "(default: the old SmolLM2 main job's)",
    )
    args = parser.parse_args()
    args.cache = Path(args.out).with_suffix(".pt")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    data = torch.load(args.cache) if args.cache.is_file() else measure(args)
    result = analyse(data, args.draws)
    atomic_write_text(Path(args.out), json.dumps(result, indent=1) + "\n")
    if args.figure:
        plot(result, Path(args.figure))


if __name__ == "__main__":
    main()
