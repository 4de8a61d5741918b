"""Surgery invariants on tiny random models of every adapter: reordering, masking, extraction, saving."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import rel_err
from transformers import AutoModelForCausalLM

from multipruner import PrunableModel, PruningPlan, extract, save_pruned
from multipruner.core.checkpoint import load_pruned
from multipruner.core.inspect_model import describe_layers
from multipruner.core.layout import ModelLayout
from multipruner.core.projections import projection_weight


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
    prunable = PrunableModel.prepare(tiny_model, weight_reorder=True)
    assert rel_err(tiny_model(token_ids).logits, before) < 1e-5
    # and it did permute something: the first MLP channel is now the most important one
    adapter = prunable.adapter
    mlp = adapter.mlp_module(adapter.layers(tiny_model)[0])
    rows = dict.fromkeys(adapter.mlp_in_projs, prunable.layout.mlp_width)
    scores = sum(projection_weight(mlp, adapter, n, rows).abs().sum(1) for n in adapter.mlp_in_projs)
    assert torch.all(scores[:-1] >= scores[1:])


def test_empty_plan_is_identity(tiny_model, token_ids):
    before = tiny_model(token_ids).logits
    prunable = PrunableModel.prepare(tiny_model, weight_reorder=False)
    with prunable.trial(PruningPlan.dense(prunable.layout)):
        assert torch.equal(tiny_model(token_ids).logits, before)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_extracted_equals_masked_and_counts_match(tiny_model, token_ids, seed):
    prunable = PrunableModel.prepare(tiny_model, weight_reorder=True)
    dense_logits = tiny_model(token_ids).logits
    plan = random_plan(prunable.layout, random.Random(seed))
    with prunable.trial(plan):
        masked = tiny_model(token_ids).logits
    assert torch.equal(tiny_model(token_ids).logits, dense_logits), "trial did not restore the dense model"
    pruned = extract(prunable, plan)
    assert rel_err(pruned(token_ids).logits, masked) < 1e-5
    assert plan.num_params(prunable.layout) == sum(p.numel() for p in pruned.parameters())
    # config fields match tensor shapes
    structure = pruned.config.pruned_structure["layers"]
    for spec, row in zip(structure, describe_layers(pruned), strict=True):
        if spec["mlp"]:
            assert row["mlp_width"] == spec["mlp"]["intermediate_size"]
        if spec["attention"]:
            assert (row["heads"], row["kv_heads"]) == (
                spec["attention"]["num_heads"],
                spec["attention"]["num_kv_heads"],
            )


def test_masking_holds_no_copies(tiny_llama):
    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=False)
    plan = PruningPlan.dense(prunable.layout).with_width("mlp", 0, 32).with_width("attention", 1, 32)
    layers = prunable.adapter.layers(tiny_llama)
    full_ptr = layers[0].mlp.down_proj.weight.data_ptr()
    with prunable.trial(plan):
        assert layers[0].mlp.down_proj.weight.data_ptr() == full_ptr  # a view of the same storage
        assert layers[0].mlp.gate_proj.weight.shape == (32, 64)
        # 32 query channels = 4 query heads of 8 = one KV group: 1 of the 2 KV heads, 8 rows
        assert layers[1].self_attn.k_proj.weight.shape == (8, 64)
    assert layers[0].mlp.gate_proj.weight.shape == (96, 64)


def test_save_reload_stock_transformers_and_generate(tiny_model, token_ids, tmp_path):
    prunable = PrunableModel.prepare(tiny_model, weight_reorder=True)
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
    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=False)
    pruned = extract(prunable, PruningPlan.dense(prunable.layout).without_block("mlp", 0))

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("multipruner.core.checkpoint.shutil.copy", boom)
    with pytest.raises(KeyboardInterrupt):
        save_pruned(pruned, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_corrupt_checkpoint_is_a_clear_error(tiny_llama, tmp_path):
    from multipruner.core.checkpoint import CheckpointError

    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=False)
    out = save_pruned(extract(prunable, PruningPlan.dense(prunable.layout)), None, tmp_path / "m")
    (out / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="could not load"):
        load_pruned(out)


def _narrow_plan(layout: ModelLayout) -> PruningPlan:
    """MLP 0 narrowed, attention 1 narrowed by one KV group, MLP 2 removed; layer 3 untouched."""
    return (
        PruningPlan.dense(layout)
        .with_width("mlp", 0, layout.mlp_width // 3)
        .with_width("attention", 1, layout.attention_width - layout.heads.unit_channels)
        .without_block("mlp", 2)
    )


def test_extract_leaves_nothing_on_meta(tiny_model, token_ids):
    prunable = PrunableModel.prepare(tiny_model, weight_reorder=True)
    plan = random_plan(prunable.layout, random.Random(3))
    with prunable.trial(plan):
        masked = tiny_model(token_ids).logits
    pruned = extract(prunable, plan)
    assert [n for n, p in pruned.named_parameters() if p.is_meta] == []
    assert [n for n, b in pruned.named_buffers() if b.is_meta] == []
    # the non-persistent buffers (rotary frequencies, Gemma's embed scale) come from the dense model
    dense_buffers = dict(tiny_model.named_buffers())
    for name, buffer in pruned.named_buffers():
        assert torch.equal(buffer, dense_buffers[name]), name
    assert not pruned.training
    assert rel_err(pruned(token_ids).logits, masked) < 1e-6


def test_extract_refuses_to_return_meta_tensors(tiny_llama, monkeypatch):
    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=False)
    monkeypatch.setattr("multipruner.core.extract._fill_meta_buffers", lambda pruned, dense: None)
    with pytest.raises(RuntimeError, match="internal error.*meta device.*inv_freq"):
        extract(prunable, PruningPlan.dense(prunable.layout))


def test_extract_reuses_dense_storage_and_copies_only_column_slices(tiny_llama):
    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=False)
    plan = _narrow_plan(prunable.layout)
    width = plan.mlp_width[0]
    pruned = extract(prunable, plan)
    dense_layers, layers = prunable.adapter.layers(tiny_llama), prunable.adapter.layers(pruned)

    def storage(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()

    # kept whole: the very same memory (no random init, no copy)
    assert layers[3].mlp.down_proj.weight.data_ptr() == dense_layers[3].mlp.down_proj.weight.data_ptr()
    assert layers[3].self_attn.q_proj.weight.data_ptr() == dense_layers[3].self_attn.q_proj.weight.data_ptr()
    assert pruned.model.embed_tokens.weight.data_ptr() == tiny_llama.model.embed_tokens.weight.data_ptr()
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight  # still tied
    # row slice: a view of the dense tensor's storage
    gate, dense_gate = layers[0].mlp.gate_proj.weight, dense_layers[0].mlp.gate_proj.weight
    assert gate.shape == (width, dense_gate.shape[1])
    assert storage(gate) == storage(dense_gate)
    assert torch.equal(gate, dense_gate[:width])
    # column slice: a compact copy holding exactly the kept columns
    down, dense_down = layers[0].mlp.down_proj.weight, dense_layers[0].mlp.down_proj.weight
    assert storage(down) != storage(dense_down)
    assert down.is_contiguous() and down.untyped_storage().nbytes() == down.numel() * down.element_size()
    assert torch.equal(down, dense_down[:, :width])
    q_width = plan.attention_width[1]
    o_proj, dense_o = layers[1].self_attn.o_proj.weight, dense_layers[1].self_attn.o_proj.weight
    assert storage(o_proj) != storage(dense_o) and torch.equal(o_proj, dense_o[:, :q_width])
    # the dense model is untouched and still whole
    assert dense_gate.shape[0] == prunable.layout.mlp_width
    assert dense_layers[2].mlp.down_proj.weight.shape[1] == prunable.layout.mlp_width


def test_extract_keeps_bf16(tiny_model, token_ids):
    tiny_model.to(torch.bfloat16)
    prunable = PrunableModel.prepare(tiny_model, weight_reorder=True)
    plan = random_plan(prunable.layout, random.Random(4))
    with prunable.trial(plan):
        masked = tiny_model(token_ids).logits
    pruned = extract(prunable, plan)
    assert {p.dtype for p in pruned.parameters()} == {torch.bfloat16}
    dense_buffers = dict(tiny_model.named_buffers())
    for name, buffer in pruned.named_buffers():
        assert buffer.dtype == dense_buffers[name].dtype, name
    logits = pruned(token_ids).logits
    assert logits.dtype == torch.bfloat16
    assert torch.equal(logits, masked)


def test_save_reload_when_dense_weights_share_one_storage(tiny_llama, token_ids, tmp_path):
    # Some loaders hand out every weight as a view of one buffer; the pruned model then holds views into a
    # storage much larger than each tensor. The file must hold just the pruned tensors, and reload exactly.
    params = list(tiny_llama.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=False)
    plan = _narrow_plan(prunable.layout)
    pruned = extract(prunable, plan)
    q = prunable.adapter.layers(pruned)[3].self_attn.q_proj.weight
    assert q.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    out = save_pruned(pruned, None, tmp_path / "pruned", plan, prunable.layout)
    pruned_bytes = sum(p.numel() * p.element_size() for p in pruned.parameters())
    assert pruned_bytes <= (out / "model.safetensors").stat().st_size < pruned_bytes + 64 * 1024
    stock = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    logits = pruned(token_ids).logits
    assert torch.equal(stock(token_ids).logits, logits)
    with prunable.trial(plan):
        assert torch.equal(tiny_llama(token_ids).logits, logits)


@pytest.mark.parametrize("dtype, tied_order", [(torch.float32, [2, 5, 7]), (torch.float16, [7, 5, 2])])
def test_equal_channel_scores_are_ordered_like_the_reference_in_fp16(tiny_llama, dtype, tied_order):
    """fp32: ties keep ascending index; fp16 weights: descending index, as the reference's fp16 runs."""
    from multipruner.core.adapters import adapter_for
    from multipruner.core.importance import attention_unit_order, mlp_channel_order

    model = tiny_llama.to(dtype)
    adapter = adapter_for(model)
    layer = adapter.layers(model)[0]
    mlp = adapter.mlp_module(layer)
    with torch.no_grad():
        for name in adapter.mlp_in_projs:
            weight = getattr(mlp, name).weight
            weight.fill_(0.01)
            weight[[2, 5, 7]] = 0.5  # three channels tie for the top score
    assert mlp_channel_order(mlp, adapter)[:3].tolist() == tied_order
    attn, heads = adapter.attention_module(layer), adapter.head_layout(model.config)
    with torch.no_grad():
        for name in (adapter.q_proj, adapter.k_proj, adapter.v_proj):
            getattr(attn, name).weight.fill_(0.25)  # every unit ties
    expected = list(range(heads.num_units))
    assert attention_unit_order(attn, adapter, heads).tolist() == (
        expected if dtype == torch.float32 else expected[::-1]
    )
