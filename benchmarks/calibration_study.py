"""How the calibration set (corpus, size, sequence length) and the racing mode change the pruned model.

For each named configuration: run the search on SmolLM2-135M (or --model), then measure held-out
perplexity of the pruned (masked) model on WikiText-2 test and PTB test, which the search never sees.
One JSON file per configuration in --out (a finished configuration is not recomputed), and a Markdown
table of all of them.

    .venv/bin/python benchmarks/calibration_study.py --out runs/calibration-study CONFIG [CONFIG ...]
    .venv/bin/python benchmarks/calibration_study.py --out runs/calibration-study --table

A CONFIG is ``name:source:block_tokens:width_tokens:seqlen:race`` (race: exact | fast | off), or
``name:source:s<block_samples>:s<width_samples>:seqlen:race`` for the reference's sample counts.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from multipruner.core.surgery import PrunableModel
from multipruner.data import eval_token_stream
from multipruner.evaluation.perplexity import stream_perplexity
from multipruner.io_utils import atomic_write_text
from multipruner.models import load_model
from multipruner.search.calibration import SetSize, build_calibration_sets
from multipruner.search.loop import run_search
from multipruner.search.objective import LossSettings, ignored_label
from multipruner.search.scoring import CalibrationScorer
from multipruner.search.settings import SearchSettings

log = logging.getLogger("calibration_study")


def parse_size(text: str) -> SetSize:
    return SetSize(samples=int(text[1:])) if text.startswith("s") else SetSize(tokens=int(text))


def held_out(model, tokenizer, windows: int, seqlen: int) -> dict:
    out = {}
    for source in ("wikitext2", "ptb"):
        stream = eval_token_stream(source, tokenizer)[: windows * seqlen]
        out[source] = stream_perplexity(
            model, stream, seqlen=seqlen, ignore_index=ignored_label(tokenizer), progress=False
        )
    return out


def run_config(spec: str, args) -> dict:
    name, source, block, width, seqlen, race = spec.split(":")
    model, tokenizer = load_model(args.model)
    torch.manual_seed(0)
    prunable = PrunableModel.prepare(model, weight_reorder=True)
    layout = prunable.layout
    sets = build_calibration_sets(
        source, tokenizer, block=parse_size(block), width=parse_size(width), seqlen=int(seqlen), seed=42
    )
    loss = LossSettings(ignore_index=ignored_label(tokenizer), batch_size=2)
    scorers = {k: CalibrationScorer(prunable, v, loss) for k, v in sets.items()}
    settings = SearchSettings(
        target_ratio=args.ratio,
        distribution=tuple(float(x) for x in args.distribution.split(":")),
        mlp_group_size=args.mlp_group,
        attention_group_size=args.attn_group,
        search=race,
    )
    steps = []
    started = time.perf_counter()
    plan = run_search(prunable, scorers, settings, on_step=lambda r, p: steps.append(r), progress=False)
    search_s = time.perf_counter() - started
    prunable.apply(plan)
    ppl = held_out(model, tokenizer, args.windows, args.eval_seqlen)
    return {
        "name": name,
        "spec": spec,
        "calibration_tokens": {k: int(v.numel()) for k, v in sets.items()},
        "search_s": search_s,
        "stage_s": {
            s: sum(r.elapsed_s for r in steps if r.stage == s) for s in ("block", "mlp_width", "attn_width")
        },
        "skipped_batches": sum(r.skipped_batches for r in steps),
        "total_batches": sum(r.total_batches for r in steps),
        "ratio": plan.ratio(layout),
        "plan": plan.to_reference(),
        "steps": [{"stage": r.stage, "choice": r.choice, "ppl": r.ppl} for r in steps],
        "held_out": ppl,
        "eval": {"windows": args.windows, "seqlen": args.eval_seqlen},
    }


def dense_row(args) -> dict:
    model, tokenizer = load_model(args.model)
    return {"name": "dense", "held_out": held_out(model, tokenizer, args.windows, args.eval_seqlen)}


def table(out: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    lines = [
        "| config | calibration tokens (block / width) | search s | racing skipped | WikiText-2 | PTB |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for r in sorted(rows, key=lambda r: (r["name"] != "dense", r.get("search_s", 0))):
        tokens = r.get("calibration_tokens", {})
        skipped = f"{r['skipped_batches'] / r['total_batches']:.0%}" if r.get("total_batches") else "—"
        lines.append(
            f"| {r.get('spec', r['name'])} | {tokens.get('block', '—')} / {tokens.get('width', '—')} | "
            f"{r.get('search_s', 0):.0f} | {skipped} | {r['held_out']['wikitext2']:.2f} | {r['held_out']['ptb']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*")
    parser.add_argument("--out", default="runs/calibration-study")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=10.0)
    parser.add_argument("--distribution", default="44:52:4")
    parser.add_argument("--mlp-group", type=int, default=128)
    parser.add_argument("--attn-group", type=int, default=192)
    parser.add_argument("--windows", type=int, default=32, help="held-out windows per text")
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--dense", action="store_true", help="also measure the dense model")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [("dense", None)] if args.dense else []
    jobs += [(spec.split(":")[0], spec) for spec in args.configs]
    for name, spec in jobs:
        path = out / f"{name}.json"
        if path.is_file():
            log.info("%s: done already", name)
            continue
        result = dense_row(args) if spec is None else run_config(spec, args)
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
        log.info("%s: %s", name, result["held_out"])
    print(table(out))


if __name__ == "__main__":
    main()
