"""The invariants on the real embedded models (dequantized GGUF, fp32): SmolLM2-135M, Gemma-3-270M and
Qwen2.5-Coder-0.5B."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import load_embedded_or_skip, rel_err
from transformers import AutoModelForCausalLM

from multipruner import PrunableModel, PruningPlan, extract, layout_of, save_pruned

pytestmark = pytest.mark.slow


def _random_valid_plan(layout, seed: int) -> PruningPlan:
    rng = random.Random(seed)
    plan = PruningPlan.dense(layout)
    for kind in ("attention", "mlp"):
        for i in rng.sample(range(layout.num_layers), 3):
            plan = plan.without_block(kind, i)
    for i in range(layout.num_layers):
        units = layout.attention_width // layout.heads.unit_channels
        plan = plan.with_width("attention", i, layout.heads.unit_channels * rng.randint(1, units))
        plan = plan.with_width("mlp", i, 128 * rng.randint(1, layout.mlp_width // 128))
    return plan


def _check_model(model, tokenizer, tmp_path):
    ids = tokenizer(
        "The quick brown fox jumps over the lazy dog. Pruning removes whole structures.", return_tensors="pt"
    ).input_ids
    with torch.inference_mode():
        dense = model(ids).logits
    prunable = PrunableModel.prepare(model, weight_reorder=True)
    with torch.inference_mode():
        assert rel_err(model(ids).logits, dense) < 1e-5
    plan = _random_valid_plan(prunable.layout, seed=0)
    with torch.inference_mode(), prunable.trial(plan):
        masked = model(ids).logits
        no_cache = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    pruned = extract(prunable, plan)
    assert plan.num_params(prunable.layout) == sum(p.numel() for p in pruned.parameters())
    with torch.inference_mode():
        assert rel_err(pruned(ids).logits, masked) < 1e-5
    out = save_pruned(pruned, tokenizer, tmp_path / "pruned", plan, prunable.layout)
    stock = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.inference_mode():
        assert torch.equal(stock(ids).logits, pruned(ids).logits)
        assert torch.equal(stock.generate(ids, max_new_tokens=8, do_sample=False), no_cache)
    prunable.restore()


def test_smollm2_invariants(smollm2, tmp_path):
    model, tokenizer = smollm2
    layout = layout_of(model)
    assert (layout.num_layers, layout.num_heads, layout.num_kv_heads, layout.head_dim) == (30, 9, 3, 64)
    _check_model(model, tokenizer, tmp_path)


def test_gemma3_invariants(tmp_path):
    model, tokenizer = load_embedded_or_skip("gemma3-270m")
    layout = layout_of(model)
    assert layout.heads.is_mqa and layout.attention_width != layout.hidden_size  # 4 x 256 != 640
    _check_model(model, tokenizer, tmp_path)


def test_qwen25_invariants(tmp_path):
    """The Qwen2 path on real weights: q/k/v biases, GQA 14/2, an untied 151k-token head."""
    model, tokenizer = load_embedded_or_skip("qwen2.5-0.5b")
    layout = layout_of(model)
    assert (layout.num_layers, layout.num_heads, layout.num_kv_heads) == (24, 14, 2) and layout.kv_bias
    _check_model(model, tokenizer, tmp_path)
