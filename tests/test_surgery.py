"""Surgery invariants on tiny random models of every adapter: reordering, masking, extraction, saving."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import rel_err
from transformers import AutoModelForCausalLM

from multipruner import PruningPlan, extract, prepare_dense, save_pruned
from multipruner.export import load_pruned
from multipruner.layout import ModelLayout


def random_plan(layout: ModelLayout, rng: random.Random) -> PruningPlan:
    plan = PruningPlan.dense(layout)
    n = layout.num_layers
    for kind in ("attention", "mlp"):
        for i in rng.sample(range(n), rng.randint(0, n - 1)):
            plan = plan.without_block(kind, i)
    unit = layout.heads.unit_channels
    for i in range(n):
        plan = plan.with_width("attention", i, unit * rng.randint(1, layout.attention_width // unit))
        plan = plan.with_width("mlp", i, rng.randint(1, layout.mlp_width))
    return plan


def test_reorder_keeps_outputs(tiny_model, token_ids):
    before = tiny_model(token_ids).logits
    prunable = prepare_dense(tiny_model, weight_reorder=True)
    assert rel_err(tiny_model(token_ids).logits, before) < 1e-5
    # and it did permute something: the first MLP channel is now the most important one
    mlp = prunable.adapter.mlp_module(prunable.adapter.layers(tiny_model)[0])
    scores = sum(getattr(mlp, n).weight.abs().sum(1) for n in prunable.adapter.mlp_in_projs)
    assert torch.all(scores[:-1] >= scores[1:])


def test_empty_plan_is_identity(tiny_model, token_ids):
    before = tiny_model(token_ids).logits
    prunable = prepare_dense(tiny_model, weight_reorder=False)
    with prunable.trial(PruningPlan.dense(prunable.layout)):
        assert torch.equal(tiny_model(token_ids).logits, before)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_extracted_equals_masked_and_counts_match(tiny_model, token_ids, seed):
    prunable = prepare_dense(tiny_model, weight_reorder=True)
    dense_logits = tiny_model(token_ids).logits
    plan = random_plan(prunable.layout, random.Random(seed))
    plan.validate(prunable.layout)
    with prunable.trial(plan):
        masked = tiny_model(token_ids).logits
    assert torch.equal(tiny_model(token_ids).logits, dense_logits), "trial did not restore the dense model"
    pruned = extract(prunable, plan)
    assert rel_err(pruned(token_ids).logits, masked) < 1e-5
    assert plan.num_params(prunable.layout) == sum(p.numel() for p in pruned.parameters())
    # config fields match tensor shapes
    structure = pruned.config.pruned_structure["layers"]
    for spec, layer in zip(structure, prunable.adapter.layers(pruned), strict=True):
        if spec["mlp"]:
            assert layer.mlp.down_proj.in_features == spec["mlp"]["intermediate_size"]
        if spec["attention"]:
            assert (
                layer.self_attn.q_proj.out_features
                == spec["attention"]["num_heads"] * prunable.layout.head_dim
            )


def test_masking_holds_no_copies(tiny_llama):
    prunable = prepare_dense(tiny_llama, weight_reorder=False)
    plan = PruningPlan.dense(prunable.layout).with_width("mlp", 0, 32).with_width("attention", 1, 16)
    layers = prunable.adapter.layers(tiny_llama)
    full_ptr = layers[0].mlp.down_proj.weight.data_ptr()
    with prunable.trial(plan):
        assert layers[0].mlp.down_proj.weight.data_ptr() == full_ptr  # a view of the same storage
        assert layers[0].mlp.gate_proj.weight.shape == (32, 64)
        assert layers[1].self_attn.k_proj.weight.shape == (
            4,
            64,
        )  # 16 q channels = 2 heads = 1 of 2 KV heads... of 8
    assert layers[0].mlp.gate_proj.weight.shape == (96, 64)


def test_save_reload_stock_transformers_and_generate(tiny_model, token_ids, tmp_path):
    prunable = prepare_dense(tiny_model, weight_reorder=True)
    layout = prunable.layout
    plan = PruningPlan.dense(layout).without_block("attention", 0).without_block("mlp", 1)
    plan = plan.with_width("mlp", 2, layout.mlp_width // 2).with_width(
        "attention", 2, layout.heads.unit_channels
    )
    pruned = extract(prunable, plan)
    out = save_pruned(pruned, None, tmp_path / "pruned", plan, layout)
    stock = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ours, _ = load_pruned(out)
    logits = pruned(token_ids).logits
    assert torch.equal(stock(token_ids).logits, logits)
    assert torch.equal(ours(token_ids).logits, logits)
    # generation with the KV cache (layer 0 has no attention, so no cache entry) equals the masked model
    # generating without a cache, token for token
    prompt = token_ids[:1, :8]
    with prunable.trial(plan):
        no_cache = tiny_model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(stock.generate(prompt, max_new_tokens=12, do_sample=False), no_cache)
    assert torch.equal(pruned.generate(prompt, max_new_tokens=12, do_sample=False), no_cache)
    # removed blocks hold no weights
    names = [n for n, _ in stock.named_parameters()]
    assert not any(
        n.startswith("model.layers.0.self_attn") or n.startswith("model.layers.0.input_layernorm")
        for n in names
    )
    assert not any(n.startswith("model.layers.1.mlp") for n in names)


def test_interrupted_save_leaves_nothing_that_looks_complete(tiny_llama, tmp_path, monkeypatch):
    prunable = prepare_dense(tiny_llama, weight_reorder=False)
    pruned = extract(prunable, PruningPlan.dense(prunable.layout).without_block("mlp", 0))

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("multipruner.export.shutil.copy", boom)
    with pytest.raises(KeyboardInterrupt):
        save_pruned(pruned, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_corrupt_checkpoint_is_a_clear_error(tiny_llama, tmp_path):
    from multipruner.export import CheckpointError

    prunable = prepare_dense(tiny_llama, weight_reorder=False)
    out = save_pruned(extract(prunable, PruningPlan.dense(prunable.layout)), None, tmp_path / "m")
    (out / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="could not load"):
        load_pruned(out)
