"""A run's extracted model, loaded with stock transformers, against the dense model masked by the run's plan.

Prints the loaded class, its parameter count against the plan's, the largest logit difference relative
to the largest logit (64 tokens), and a greedy continuation.

    .venv/bin/python benchmarks/stock_reload_check.py --model qwen2.5-0.5b --run runs/qwen-10
"""

import argparse
import json

import torch
from transformers import AutoModelForCausalLM

from multipruner import PrunableModel, load_model
from multipruner.core.layout import layout_of
from multipruner.core.plan import load_plan

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True, help="the dense model the run pruned")
parser.add_argument("--run", required=True, help="the run directory (plan.json and model/)")
args = parser.parse_args()

dense, tokenizer = load_model(args.model)
plan = load_plan(f"{args.run}/plan.json", layout_of(dense))
prunable = PrunableModel.from_plan(dense, plan)
ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt").input_ids[:, :64]
with torch.no_grad(), prunable.trial(plan):
    masked = dense(ids).logits
stock = AutoModelForCausalLM.from_pretrained(f"{args.run}/model", trust_remote_code=True).eval()
with torch.no_grad():
    extracted = stock(ids).logits
prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
greedy = stock.generate(prompt, max_new_tokens=12, do_sample=False)
print(
    json.dumps(
        {
            "class": type(stock).__name__,
            "params": sum(p.numel() for p in stock.parameters()),
            "plan_params": plan.num_params(prunable.layout),
            "max_rel_err": ((extracted - masked).abs().max() / masked.abs().max()).item(),
            "same_argmax": bool((extracted.argmax(-1) == masked.argmax(-1)).all()),
            "greedy": tokenizer.decode(greedy[0]),
        }
    )
)
