"""Plan validation, counting and file formats."""

from __future__ import annotations

import json

import pytest

from multipruner import PlanError, PruningPlan, layout_of, load_plan
from multipruner.adapters import UnsupportedArchitectureError, adapter_for


@pytest.fixture
def layout(tiny_llama):
    return layout_of(tiny_llama)


def test_dense_count_matches_model(tiny_model):
    layout = layout_of(tiny_model)
    assert PruningPlan.dense(layout).num_params(layout) == sum(p.numel() for p in tiny_model.parameters())
    assert PruningPlan.dense(layout).ratio(layout) == 0.0


def test_reference_round_trip(layout, tmp_path):
    plan = (
        PruningPlan.dense(layout)
        .without_block("attention", 2)
        .with_width("mlp", 1, 48)
        .with_width("attention", 0, 32)
    )
    ref = plan.to_reference()
    assert ref["pruned_attn_idx"] == [2] and ref["pruned_mlp_width"]["1"] == 48
    path = tmp_path / "pruning_config.json"
    path.write_text(json.dumps(ref))
    assert load_plan(path, layout) == plan
    ours = tmp_path / "plan.json"
    plan.save(ours, layout)
    assert load_plan(ours, layout) == plan
    assert json.loads(ours.read_text())["params"]["pruned"] == plan.num_params(layout)


def test_reference_published_shape_is_readable(layout, tmp_path):
    # the authors' files list every layer with int-like string keys
    path = tmp_path / "p.json"
    path.write_text(
        json.dumps(
            {
                "pruned_attn_idx": [3],
                "pruned_mlp_idx": [],
                "pruned_attn_width": {str(i): 64 for i in range(4)},
                "pruned_mlp_width": {"0": 96, "1": 64, "2": 96, "3": 96},
            }
        )
    )
    plan = load_plan(path, layout)
    assert plan.removed_attention == {3} and plan.mlp_width[1] == 64


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: p.with_width("attention", 0, 24), "whole KV groups"),  # 8 heads x 8 dims, units of 32
        (lambda p: p.without_block("mlp", 7), "out of range"),
        (lambda p: p.with_width("mlp", 0, 200), "outside"),
    ],
)
def test_invalid_plans_name_the_problem(layout, mutate, message):
    with pytest.raises(PlanError, match=message):
        mutate(PruningPlan.dense(layout)).validate(layout)


def test_mlp_width_must_be_whole_groups(layout):
    from dataclasses import replace

    plan = replace(PruningPlan.dense(layout), mlp_group_size=32).with_width("mlp", 0, 80)
    with pytest.raises(PlanError, match="groups of 32"):
        plan.validate(layout)


def test_attention_group_size_must_not_split_kv_group(layout):
    from dataclasses import replace

    with pytest.raises(PlanError, match="splits a KV group"):
        replace(PruningPlan.dense(layout), attention_group_size=16).validate(layout)


def test_missing_and_malformed_files(layout, tmp_path):
    with pytest.raises(PlanError, match="not found"):
        load_plan(tmp_path / "nope.json", layout)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_plan(bad, layout)
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(PlanError, match="not a multipruner plan"):
        load_plan(bad, layout)


def test_plan_for_another_model_is_rejected(layout, tmp_path, tiny_model):
    other = layout_of(tiny_model)
    path = tmp_path / "plan.json"
    PruningPlan.dense(other).save(path, other)
    if (other.num_layers, other.hidden_size) != (layout.num_layers, layout.hidden_size):
        with pytest.raises(PlanError, match="made for a model"):
            load_plan(path, layout)


def test_unsupported_architecture_lists_supported():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedArchitectureError, match="supported model types: gemma3_text, llama"):
        adapter_for(GPT2Config())
