"""Plan validation, counting and file formats."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import TINY_MODELS

from multipruner import PlanError, PruningPlan, layout_of, load_plan
from multipruner.core.adapters import UnsupportedArchitectureError, adapter_for


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
    plan = replace(PruningPlan.dense(layout), mlp_group_size=32).with_width("mlp", 0, 80)
    with pytest.raises(PlanError, match="groups of 32"):
        plan.validate(layout)


def test_attention_group_size_must_not_split_kv_group(layout):
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


def _shape(layout) -> tuple[int, int]:
    return layout.num_layers, layout.hidden_size


@pytest.mark.parametrize("differs_in", ["architecture", "num_layers", "hidden_size"])
def test_plan_for_another_model_is_rejected(tiny_model, differs_in, tmp_path):
    # Saved with the parametrised model's layout, loaded against a layout that really differs.
    made_for = layout_of(tiny_model)
    if differs_in == "architecture":
        others = (layout_of(build()) for build in TINY_MODELS.values())
        loaded_with = next(o for o in others if _shape(o) != _shape(made_for))
    elif differs_in == "num_layers":
        loaded_with = replace(made_for, num_layers=made_for.num_layers + 1)
    else:  # only the hidden size: the plan's widths still fit, so only the stored layout can tell
        loaded_with = replace(made_for, hidden_size=made_for.hidden_size * 2)
    assert _shape(loaded_with) != _shape(made_for)
    path = tmp_path / "plan.json"
    PruningPlan.dense(made_for).save(path, made_for)
    assert load_plan(path, made_for) == PruningPlan.dense(made_for)  # its own model accepts it
    saved = f"made for a model with {made_for.num_layers} layers / hidden size {made_for.hidden_size}"
    loading = f"not this one ({loaded_with.num_layers} / {loaded_with.hidden_size})"
    with pytest.raises(PlanError) as err:
        load_plan(path, loaded_with)
    assert saved in str(err.value) and loading in str(err.value), str(err.value)


def test_unsupported_architecture_lists_supported():
    from transformers import GPT2Config

    with pytest.raises(
        UnsupportedArchitectureError,
        match="supported model types: gemma2, gemma3_text, llama, mistral, olmo2, phi3, qwen2, qwen3",
    ):
        adapter_for(GPT2Config())


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(mlp_group_size="abc"), "malformed multipruner plan"),
        (lambda d: d.update(removed_mlp=[9]), "out of range"),  # the plan's own layout has 4 layers
        (lambda d: d["mlp_width"].__setitem__(0, 500), "outside"),
        (lambda d: d.update(format="something-else"), "not a multipruner plan"),
        (lambda d: d["layout"].pop("hidden_size"), "malformed layout"),
    ],
)
def test_plan_files_are_checked_before_any_model_loads(layout, tmp_path, capsys, edit, message):
    """The model path does not even exist: the plan's own problem must be what the user reads."""
    from multipruner.cli import main

    path = tmp_path / "plan.json"
    PruningPlan.dense(layout).without_block("attention", 2).save(path, layout)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    out = tmp_path / "out"
    assert (
        main(
            ["extract", "--model", str(tmp_path / "no-such-model"), "--plan", str(path), "--output", str(out)]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert message in err and "no-such-model" not in err
    assert not out.exists()


def test_reference_plans_with_bad_types_fail_before_the_model(tmp_path, capsys):
    from multipruner.cli import main

    path = tmp_path / "pruning_config.json"
    path.write_text(json.dumps({"pruned_attn_idx": ["x"], "pruned_mlp_width": {}}))
    assert (
        main(
            [
                "extract",
                "--model",
                str(tmp_path / "nope"),
                "--plan",
                str(path),
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "malformed reference pruning_config" in capsys.readouterr().err
