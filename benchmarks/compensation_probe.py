"""Held-out perplexity of one plan: plain pruning vs compensation of narrowed branches vs also folding a
least-squares map for each removed block (``--compensate-blocks``).

The plan is the old main job's (calibration on 2,048 + 512 PIQA tokens; docs/history.md section 1);
compensation uses 4,096 + 4,096 tokens of the default mix (as measured); held-out: the first N windows of 2,048 tokens of
WikiText-2 test and PTB test (N = the first argument, default 8).

    .venv/bin/python benchmarks/compensation_probe.py 8
"""

import sys
import time

import torch

from multipruner import PrunableModel, PruningPlan, extract, load_model
from multipruner.data import eval_token_stream
from multipruner.evaluation.perplexity import stream_perplexity
from multipruner.repair.compensate import CompensateSettings, compensate
from multipruner.search.calibration import CalibrationSettings
from multipruner.search.objective import ignored_label

ref = {
    "pruned_attn_idx": [5, 7, 17, 26, 29],
    "pruned_mlp_idx": [17],
    "pruned_attn_width": {"10": 384, "28": 384},
    "pruned_mlp_width": {
        "3": 1408,
        "4": 1408,
        "5": 896,
        "10": 1152,
        "11": 384,
        "16": 1408,
        "23": 1280,
        "26": 896,
    },
}
model, tok = load_model("smollm2-135m")
prunable = PrunableModel.prepare(model, True)
plan = PruningPlan.from_reference(ref, prunable.layout)
W = int(sys.argv[1]) if len(sys.argv) > 1 else 8


def held(m):
    return {
        s: round(
            stream_perplexity(
                m,
                eval_token_stream(s, tok)[: W * 2048],
                seqlen=2048,
                ignore_index=ignored_label(tok),
                progress=False,
            ),
            3,
        )
        for s in ("wikitext2", "ptb")
    }


sets = CalibrationSettings(block_tokens=4096, width_tokens=4096).build(tok)  # 8,192 tokens of the mix
tokens = torch.cat([sets["width"], sets["block"]])
print("plain", held(extract(prunable, plan)), flush=True)
for blocks in (False, True):
    pruned = extract(prunable, plan)
    t = time.time()
    fits = compensate(prunable, pruned, plan, tokens, CompensateSettings(blocks=blocks), progress=False)
    print(
        "blocks" if blocks else "widths",
        "time",
        round(time.time() - t, 1),
        [(f.layer, f.kind[:40], round(f.error_after / max(f.error_before, 1e-30), 3)) for f in fits],
        flush=True,
    )
    print("compensated blocks" if blocks else "compensated widths", held(pruned), flush=True)
