"""Plan validation, counting and file formats."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import TINY_MODELS

from multipruner import PlanError, PrunableModel, PruningPlan, extract, layout_of, load_plan
from multipruner.core.adapters import ADAPTERS, UnsupportedArchitectureError, adapter_for, pruned_model_class


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
    "build, message",
    [
        (lambda p: p.without_block("mlp", 7), "out of range"),  # 4 layers
        (lambda p: p.with_width("mlp", 0, 0), "MLP width 0 is not positive"),
        (lambda p: replace(p, mlp_width=p.mlp_width[:-1]), "one per layer"),
        (lambda p: replace(p, mlp_group_size=0), "MLP group size 0 is not positive"),
        (lambda p: replace(p, attention_width=(*p.attention_width[:-1], 2.5)), "whole numbers"),
        (lambda p: replace(p, removed_attention=frozenset(range(4))), "every attention block"),
    ],
)
def test_a_plan_that_fits_no_model_cannot_be_built(layout, build, message):
    with pytest.raises(PlanError, match=message):
        build(PruningPlan.dense(layout))


def test_a_removed_blocks_width_is_not_checked(tiny_llama, layout):
    # widths of removed blocks are kept as they were and ignored
    plan = PruningPlan.dense(layout).without_block("mlp", 1).with_width("mlp", 1, 0)
    PrunableModel(tiny_llama).apply(plan)


# plans that are well formed but do not fit this model: refused where they meet it, with no call to check
UNFIT = [
    (lambda p: p.with_width("attention", 0, 24), "whole KV groups"),  # 8 heads x 8 dims, units of 32
    (lambda p: p.with_width("mlp", 0, 200), "outside"),
    (lambda p: replace(p, mlp_group_size=32).with_width("mlp", 0, 80), "groups of 32"),
    (lambda p: replace(p, attention_group_size=16), "splits a KV group"),
    (
        lambda p: replace(p, mlp_width=p.mlp_width * 2, attention_width=p.attention_width * 2),
        "model has 4 layers",
    ),
]


@pytest.mark.parametrize("unfit, message", UNFIT)
def test_a_plan_that_does_not_fit_is_refused_where_it_meets_the_model(tiny_llama, layout, unfit, message):
    plan = unfit(PruningPlan.dense(layout))
    model = tiny_llama
    prunable = PrunableModel(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for meet in (prunable.apply, lambda p: prunable.trial(p).__enter__(), lambda p: extract(prunable, p)):
        with pytest.raises(PlanError, match=message):
            meet(plan)
        # refused before anything changed: the model is still the dense one
        assert prunable.plan == PruningPlan.dense(layout)
        assert model.state_dict().keys() == before.keys()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("unfit, message", UNFIT[:4])
def test_a_plan_file_that_does_not_fit_is_refused_when_loaded(layout, tmp_path, unfit, message):
    path = tmp_path / "plan.json"
    unfit(PruningPlan.dense(layout)).save(path)  # saved without a layout: only the loading model can tell
    with pytest.raises(PlanError, match=message):
        load_plan(path, layout)


def test_one_group_size_check_for_plans_and_searches(tiny_llama, layout):
    """The plan and the search settings refuse a KV-group-splitting group with the same words."""
    from multipruner.search.settings import SearchConfigError, SearchSettings

    with pytest.raises(PlanError) as plan_error:
        PrunableModel(tiny_llama).apply(replace(PruningPlan.dense(layout), attention_group_size=16))
    with pytest.raises(SearchConfigError) as search_error:
        SearchSettings(attention_group_size=16).validate(layout)
    said = layout.heads.attention_group_problem(16)
    assert said and said in str(plan_error.value) and said in str(search_error.value)
    assert layout.heads.attention_group_problem(64) is None


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


def test_every_adapter_type_has_a_pruned_class_and_no_other_type_has_one():
    """The adapters are the list of supported types; the saved model code, which cannot import them, must
    hold a pruned class for exactly those types, each built on its family's own model class."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from multipruner.core.modeling.modeling_multipruner import PRUNED_CLASSES, PrunedCausalLMMixin

    adapter_types = {t for adapter in ADAPTERS for t in adapter.model_types}
    assert adapter_types == set(PRUNED_CLASSES)
    for model_type in sorted(adapter_types):
        cls = pruned_model_class(model_type)
        dense_cls = AutoModelForCausalLM._model_mapping[type(AutoConfig.for_model(model_type))]
        assert issubclass(cls, PrunedCausalLMMixin) and issubclass(cls, dense_cls), model_type
    with pytest.raises(UnsupportedArchitectureError, match="supported model types"):
        pruned_model_class("gpt2")


@pytest.mark.parametrize("accounting", ["exact", "reference"])
def test_the_searchs_params_cost_is_the_plans_ratio_in_either_accounting(layout, accounting):
    import random

    from test_surgery import random_plan

    from multipruner.search.cost import Cost

    cost = Cost(layout, "params", accounting)
    plans = [PruningPlan.dense(layout), *(random_plan(layout, random.Random(seed)) for seed in range(8))]
    assert [cost.reduction(p) for p in plans] == [p.ratio(layout, accounting) for p in plans]
    assert cost.reduction(PruningPlan.dense(layout)) == 0.0
    # the accounting is honoured: a removed block's norms count in one and not the other
    removed = PruningPlan.dense(layout).without_block("mlp", 0)
    other = "exact" if accounting == "reference" else "reference"
    assert cost.reduction(removed) != Cost(layout, "params", other).reduction(removed)
