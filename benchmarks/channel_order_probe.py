"""Held-out perplexity of one plan's widths under the two channel orders (L1 weights vs activations).

The plan is the main job's while channels were ordered by L1 norms (docs/history.md section 3); the
activation order is taken on the default calibration sets (2,048 + 1,024 tokens of the mix). Held-out:
the first N windows of 2,048 tokens of WikiText-2 test and PTB test (N = the first argument, default 8).

    .venv/bin/python benchmarks/channel_order_probe.py 8
"""

import sys

import torch

from multipruner import PrunableModel, PruningPlan, extract, load_model
from multipruner.core.importance import activation_channel_order
from multipruner.data import eval_token_stream
from multipruner.evaluation.perplexity import stream_perplexity
from multipruner.search.calibration import CalibrationSettings
from multipruner.search.objective import ignored_label

L1_PLAN = {
    "pruned_attn_idx": [6, 7, 9, 17, 22, 26, 29],
    "pruned_mlp_idx": [],
    "pruned_attn_width": {"24": 384, "25": 384},
    "pruned_mlp_width": {
        "3": 1024,
        "5": 1152,
        "10": 1408,
        "11": 384,
        "13": 512,
        "16": 1408,
        "23": 1408,
        "24": 1024,
    },
}
windows = int(sys.argv[1]) if len(sys.argv) > 1 else 8


def held_out(model, tokenizer) -> dict[str, float]:
    return {
        text: round(
            stream_perplexity(
                model,
                eval_token_stream(text, tokenizer)[: windows * 2048],
                seqlen=2048,
                ignore_index=ignored_label(tokenizer),
                progress=False,
            ),
            3,
        )
        for text in ("wikitext2", "ptb")
    }


model, tokenizer = load_model("smollm2-135m")
sets = CalibrationSettings().build(tokenizer)
order = activation_channel_order(model, torch.cat([sets["block"], sets["width"]]), batch_size=2)
for name, channel_order in (("l1", None), ("activations", order)):
    dense = load_model("smollm2-135m")[0]
    prunable = PrunableModel.prepare(dense, True, channel_order)
    plan = PruningPlan.from_reference(L1_PLAN, prunable.layout)
    print(name, held_out(extract(prunable, plan), tokenizer), flush=True)
