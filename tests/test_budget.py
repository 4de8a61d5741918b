"""Budgets in other measures than parameters, and ``--distribution auto`` (issue: prune to a deployment
budget): the counted costs equal what the extracted models measure, and auto's steps are the ones a
brute-force greedy with the same rule makes."""

from __future__ import annotations

import pytest
import torch

from multipruner import PrunableModel
from multipruner.core.checkpoint import save_pruned
from multipruner.core.extract import extract
from multipruner.evaluation.model_cost import measured_cost
from multipruner.search.cost import COUNTED_MEASURES, Budget, BudgetError, Cost
from multipruner.search.loop import initial_plan, run_search
from multipruner.search.objective import LossSettings, full_forward_nll
from multipruner.search.scoring import CalibrationScorer
from multipruner.search.settings import SearchConfigError, SearchSettings
from multipruner.search.stages import Candidate

CONTEXT = 12


def _tokens(vocab: int, n: int = 6, seqlen: int = 20, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _settings(layout, **kw) -> SearchSettings:
    base = dict(
        distribution="auto",
        mlp_group_size=layout.mlp_width // 4,
        attention_group_size=layout.heads.unit_channels,
        objective="nll",
        screen_tokens=0,
        width_screen="forward",
        cost_context=CONTEXT,
    )
    return SearchSettings(**{**base, **kw})


def _search(prunable, settings, tokens, head_bound_top_k: int = 16):
    loss = LossSettings(ignore_index=5, batch_size=2, head_bound_top_k=head_bound_top_k)
    scorers = {
        "block": CalibrationScorer(prunable, tokens, loss),
        "width": CalibrationScorer(prunable, tokens, loss),
    }
    records = []
    plan = run_search(prunable, scorers, settings, on_step=lambda rec, p: records.append(rec), progress=False)
    return plan, records, loss


@pytest.mark.parametrize("measure", COUNTED_MEASURES)
def test_the_chosen_candidates_saved_costs_add_up_to_what_the_extracted_model_measures(
    tiny_model, measure, tmp_path
):
    prunable = PrunableModel.prepare(tiny_model, weight_reorder=True)
    layout = prunable.layout
    settings = _settings(layout, budget=f"{measure}=30%", search="exact")
    plan, records, _ = _search(prunable, settings, _tokens(tiny_model.config.vocab_size))
    assert records and all(r.measure == measure for r in records)
    saved = sum(
        next(c["saved_cost"] for c in r.candidates if Candidate.from_dict(c) == Candidate.from_dict(r.choice))
        for r in records
    )

    pruned = extract(prunable, plan)
    prunable.restore()  # the search leaves its plan applied to the dense model
    dense_dir, pruned_dir = tmp_path / "dense", tmp_path / "pruned"
    if measure == "weights-bytes":
        tiny_model.save_pretrained(dense_dir)
        save_pruned(pruned, None, pruned_dir, plan, layout)
    dense_measured = measured_cost(tiny_model, measure, CONTEXT, dense_dir)
    pruned_measured = measured_cost(pruned, measure, CONTEXT, pruned_dir)
    cost = Cost(layout, measure, dtype_bytes=4, context=CONTEXT)
    assert cost.dense() == dense_measured
    assert cost.of(plan) == pruned_measured
    assert saved == dense_measured - pruned_measured  # whole numbers below 2**53: exact in floats
    assert records[-1].reduction == pytest.approx(100 * (1 - pruned_measured / dense_measured))
    assert (
        records[-1].reduction >= 30.0
        and records[-2 if len(records) > 1 else -1].reduction < 30.0
        or len(records) == 1
    )


def _brute_force_auto(prunable, records, tokens, loss, settings):
    """Each step again: every candidate's total NLL by a full forward from the step's base plan, ranked by
    the loss it adds per unit it saves; the same choice, and the ranks the search recorded."""
    model, layout = prunable.model, prunable.layout
    cost = settings.cost(layout, 4)
    plan = initial_plan(layout, settings.resolved(layout))
    for rec in records:
        with prunable.trial(plan):
            base = full_forward_nll(model, tokens, loss).double().sum().item()
        keys = []
        for c in rec.candidates:
            candidate = Candidate.from_dict(c)
            smaller = candidate.apply(plan)
            assert c["saved_cost"] == cost.saved(plan, smaller) > 0
            with prunable.trial(smaller):
                total = full_forward_nll(model, tokens, loss).double().sum().item()
            keys.append((total - base) / c["saved_cost"])
            if c.get("rank") is not None:
                assert c["rank"] == pytest.approx(keys[-1], rel=1e-4, abs=1e-6)
        best = min(range(len(keys)), key=lambda k: (keys[k], k))
        assert Candidate.from_dict(rec.candidates[best]) == Candidate.from_dict(rec.choice)
        # a candidate racing left unfinished ranks behind the choice
        unfinished = [k for k, c in enumerate(rec.candidates) if c.get("rank") is None]
        assert all(keys[k] >= keys[best] - 1e-6 for k in unfinished)
        plan = Candidate.from_dict(rec.choice).apply(plan)
    return plan


@pytest.mark.parametrize("mode", ["off", "exact"])
def test_auto_makes_the_steps_of_a_brute_force_greedy_over_every_dimension(tiny_model, mode):
    prunable = PrunableModel.prepare(tiny_model, weight_reorder=True)
    layout = prunable.layout
    tokens = _tokens(tiny_model.config.vocab_size)
    settings = _settings(layout, target_ratio=35.0, search=mode)
    plan, records, loss = _search(prunable, settings, tokens, head_bound_top_k=1)
    kinds = {Candidate.from_dict(c).kind for r in records for c in r.candidates}
    assert kinds == {"attention", "mlp"} and {c["op"] for r in records for c in r.candidates} == {
        "remove",
        "shrink",
    }
    assert all(r.stage == "auto" for r in records) and records[-1].reduction >= 35.0
    assert _brute_force_auto(prunable, records, tokens, loss, settings) == plan
    # and racing or the head bound spared work under the ranking (Gemma 2's soft-capped logits have no bound)
    if mode == "exact" and tiny_model.config.model_type != "gemma2":
        assert sum(r.skipped_batches + r.bounded_batches for r in records) > 0


def test_auto_screened_with_every_candidate_a_finalist_chooses_as_exact_scoring(tiny_llama):
    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=True)
    layout = prunable.layout
    tokens = _tokens(tiny_llama.config.vocab_size, n=8)
    exact = _search(prunable, _settings(layout, target_ratio=30.0), tokens)[0]
    prunable.restore()
    screened = _search(
        prunable, _settings(layout, target_ratio=30.0, screen_tokens=40, finalists=1000), tokens
    )[0]
    assert screened == exact
    prunable.restore()
    top3, records, _ = _search(prunable, _settings(layout, target_ratio=30.0, screen_tokens=40), tokens)
    assert all(len(r.finalists) == 3 for r in records if r.finalists is not None)


def test_a_kv_budget_removes_only_attention_and_reaches_its_share(tiny_llama):
    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=True)
    settings = _settings(prunable.layout, budget="kv=50%")
    plan, records, _ = _search(prunable, settings, _tokens(tiny_llama.config.vocab_size))
    assert {Candidate.from_dict(c).kind for r in records for c in r.candidates} == {"attention"}
    assert (
        plan.mlp_width == (prunable.layout.mlp_width,) * prunable.layout.num_layers and not plan.removed_mlp
    )
    assert records[-1].reduction >= 50.0


@pytest.mark.parametrize(
    "text, measure, form, value",
    [
        ("params=20%", "params", "percent", 20.0),
        ("weights=400MB", "weights-bytes", "amount", 400e6),
        ("weights-bytes=1.5GiB", "weights-bytes", "amount", 1.5 * 2**30),
        ("kv=50%", "kv-bytes", "percent", 50.0),
        ("flops=1.25x", "flops", "factor", 1.25),
        ("params=90M", "params", "amount", 90e6),
    ],
)
def test_budget_texts(text, measure, form, value):
    assert Budget.parse(text) == Budget(measure, value, form)


def test_each_budget_form_asks_for_the_reduction_it_names(tiny_llama):
    layout = PrunableModel.prepare(tiny_llama, weight_reorder=False).layout
    cost = Cost(layout, "weights-bytes", dtype_bytes=4)
    assert Budget.parse("weights=25%").reduction(cost) == 25.0
    assert Budget.parse("weights=1.25x").reduction(cost) == pytest.approx(20.0)
    half = cost.dense() / 2
    assert Budget.parse(f"weights={half:.0f}B").reduction(cost) == pytest.approx(50.0)
    with pytest.raises(BudgetError, match="give MEASURE=VALUE"):
        Budget.parse("latency=2x")


def test_an_unreachable_budget_is_refused_with_the_most_the_model_can_give(tiny_llama):
    layout = PrunableModel.prepare(tiny_llama, weight_reorder=False).layout
    with pytest.raises(
        SearchConfigError, match=r"the most this model can lose of its flops is [0-9.]+ % \(flops=[0-9.]+x"
    ):
        _settings(layout, budget="flops=10x").resolved(layout)
    most = float(
        str(pytest.raises(SearchConfigError, _settings(layout, target_ratio=99.0).resolved, layout).value)
        .split("lose of its params is ")[1]
        .split(" %")[0]
    )
    _settings(layout, target_ratio=most - 0.01).resolved(layout)  # just below the most: accepted
