"""How well does a no-forward proxy rank a width step's candidates, step after step of a real search?

Reads a finished run whose width steps were screened by forward (``--width-screen forward``), so every
candidate of every width step has a screening loss (NLL or KL on the first ``--screen-tokens``) and the
finalists a decision-set score. At each width step it re-applies the step's starting plan, measures the
proxy variants on the same screening tokens, and reports, per variant:

* the rank of the step's choice (the decision set's best) in the proxy's order (1: the proxy's first);
* the rank of the forward screen's best;
* how many of the forward screen's top K the proxy's top K holds;
* the layer it ranks first at each step (where a biased proxy piles up its cuts).

Variants (the share ``s_t`` a candidate's dropped channels add to its branch output at token t, and the
residual stream ``h_t`` entering its layer):

* ``stream``: sum_t |s_t|^2 / sum_t |h_t|^2 (the search's proxy);
* ``token``: mean_t |s_t|^2 / |h_t|^2 (robust to the few tokens with a huge residual stream);
* ``raw``: mean_t |s_t|^2 (no normalisation).

    .venv/bin/python benchmarks/proxy_recall.py runs/fwd --out docs/proxy-recall.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from multipruner.core.surgery import PrunableModel
from multipruner.io_utils import atomic_write_text
from multipruner.models import load_model
from multipruner.run.run_dir import RunDirectory
from multipruner.search.loop import StepRecord, plan_from_record
from multipruner.search.settings import SearchSettings
from multipruner.search.stages import Candidate
from multipruner.settings import from_dict

VARIANTS = ("stream", "token", "raw")


@torch.inference_mode()
def proxy_variants(
    prunable: PrunableModel, candidates: list[Candidate], tokens: torch.Tensor, batch_size: int
):
    """Every variant's score per candidate (lower: safer to drop), from one forward of the current model."""
    adapter, model = prunable.adapter, prunable.model
    layers = adapter.layers(model)
    n = len(candidates)
    share = torch.zeros(n, dtype=torch.float64)
    stream = torch.zeros(n, dtype=torch.float64)
    ratio = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    last_stream: dict[int, torch.Tensor] = {}  # layer -> |h_t|^2 of the current batch
    outputs = {}  # each candidate's branch output projection -> the candidate
    for k, c in enumerate(candidates):
        branch = getattr(layers[c.layer], adapter.branch(c.kind).module)
        outputs[getattr(branch, adapter.output_projection(c.kind))] = k

    def on_out(module, args):
        k = outputs[module]
        kept = candidates[k].width
        s = (args[0][..., kept:] @ module.weight[:, kept:].T).double().pow(2).sum(-1)
        h = last_stream[candidates[k].layer]
        share[k] += s.sum()
        stream[k] += h.sum()
        ratio[k] += (s / h.clamp(min=1e-30)).sum()
        count[k] += s.numel()

    def on_layer(index):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            last_stream[index] = hidden.double().pow(2).sum(-1)

        return hook

    hooks = [m.register_forward_pre_hook(on_out) for m in outputs]
    hooks += [
        layers[i].register_forward_pre_hook(on_layer(i), with_kwargs=True)
        for i in {c.layer for c in candidates}
    ]
    try:
        for start in range(0, tokens.shape[0], batch_size):
            adapter.decoder(model)(input_ids=tokens[start : start + batch_size], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {"stream": share / stream, "token": ratio / count, "raw": share / count}


def rank_of(order: list[int], k: int) -> int:
    return order.index(k) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--model", default=None, help="default: the run's source")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    run = RunDirectory(args.run)
    manifest = run.manifest()
    model, _ = load_model(args.model or manifest.source.spec)
    final, _ = run.plan()
    prunable = PrunableModel.prepare(model, True, final.channel_order)
    settings = from_dict(SearchSettings, manifest.settings["search"]).resolved(prunable.layout)
    tokens = run.load_calibration()["width"]
    tokens = tokens[: settings.screen_rows("width", tokens.shape[0], tokens.shape[1]) or tokens.shape[0]]
    batch = manifest.settings["calibration"]["batch_size"]
    records = [StepRecord.from_dict(r) for r in run.step_records()]
    rows = []
    for prev, record in zip(records, records[1:], strict=False):
        if record.stage not in ("mlp_width", "attn_width"):
            continue
        cands = [Candidate.from_dict(c) for c in record.candidates]
        if any(c.get("screen_loss") is None for c in record.candidates):
            raise SystemExit(
                f"step {record.step} has no forward screening losses: run with --width-screen forward"
            )
        prunable.apply(plan_from_record(prev, prunable.layout, settings, final.channel_order))
        scores = proxy_variants(prunable, cands, tokens, batch)
        screen = [c["screen_loss"] for c in record.candidates]
        chosen = cands.index(Candidate.from_dict(record.choice))
        fwd_order = sorted(range(len(cands)), key=lambda k: screen[k])
        row = {
            "step": record.step,
            "stage": record.stage,
            "chosen_layer": cands[chosen].layer,
            "n": len(cands),
        }
        for v in VARIANTS:
            order = sorted(range(len(cands)), key=lambda k: scores[v][k].item())
            row[v] = {
                "chosen_rank": rank_of(order, chosen),
                "screen_best_rank": rank_of(order, fwd_order[0]),
                "top_k_overlap": len(set(order[: args.top_k]) & set(fwd_order[: args.top_k])) / args.top_k,
                "first_layer": cands[order[0]].layer,
            }
        rows.append(row)
        print(
            f"step {record.step:3d} {record.stage:10s} chosen L{cands[chosen].layer:2d}  "
            + "  ".join(
                f"{v}: rank {row[v]['chosen_rank']:2d} (L{row[v]['first_layer']:2d} first)" for v in VARIANTS
            )
        )
    summary = {
        v: {
            "chosen_in_top_k": sum(r[v]["chosen_rank"] <= args.top_k for r in rows) / len(rows),
            "mean_chosen_rank": sum(r[v]["chosen_rank"] for r in rows) / len(rows),
            "screen_best_in_top_k": sum(r[v]["screen_best_rank"] <= args.top_k for r in rows) / len(rows),
            "mean_top_k_overlap": sum(r[v]["top_k_overlap"] for r in rows) / len(rows),
        }
        for v in VARIANTS
    }
    for v, s in summary.items():
        print(v, json.dumps({k: round(x, 3) for k, x in s.items()}))
    if args.out:
        result = {"run": str(args.run), "top_k": args.top_k, "summary": summary, "steps": rows}
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
