"""The search picks what brute force picks, stops where ALGORITHM.md says, and rejects bad settings."""

from __future__ import annotations

import math

import pytest
import torch

from multipruner import PrunableModel, PruningPlan
from multipruner.search.loop import initial_plan, run_search
from multipruner.search.objective import LossSettings, full_forward_perplexity, ignored_label
from multipruner.search.racing import RaceSettings, exact_survivors, paired_survivors
from multipruner.search.scoring import CalibrationScorer
from multipruner.search.screening import FinalistRule
from multipruner.search.settings import SearchConfigError, SearchSettings
from multipruner.search.stages import STAGES, Candidate


def _calibration(vocab: int, n: int = 4, seqlen: int = 24, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)


def _settings(prunable, **kw):
    layout = prunable.layout
    base = dict(
        target_ratio=40.0,
        distribution=(40.0, 40.0, 20.0),
        mlp_group_size=layout.mlp_width // 4,
        attention_group_size=layout.heads.unit_channels,
        # the exact modes: every candidate on the whole set, by the reference's NLL (screening: test_screening)
        objective="nll",
        screen_tokens=0,
        width_screen="forward",
    )
    base.update(kw)
    return SearchSettings(**base)


@pytest.mark.parametrize("mode", ["off", "exact"])
def test_every_step_matches_brute_force(tiny_model, mode):
    records = _search_equals_brute_force(tiny_model, _settings, mode=mode)
    assert {r.stage for r in records} == {s.name for s in STAGES}


def test_every_step_matches_brute_force_when_the_head_bound_rules_candidates_out(tiny_model):
    # top-1 subsets leave most of the 128-token vocabulary to the Jensen tail (top-16 would cover it all)
    records = _search_equals_brute_force(tiny_model, _settings, mode="exact", head_bound_top_k=1)
    if tiny_model.config.model_type == "gemma2":  # soft-capped logits: no bound, every head is paid
        assert sum(r.bounded_batches for r in records) == 0
    else:
        assert sum(r.bounded_batches for r in records) > 0


def test_whole_layer_candidates_match_brute_force_and_remove_both_blocks(tiny_llama):
    dense = PruningPlan.dense(PrunableModel.prepare(tiny_llama, weight_reorder=False).layout)
    plan = Candidate("layer", "remove", 2).apply(dense)
    assert plan.removed_attention == plan.removed_mlp == {2}
    records = _search_equals_brute_force(
        tiny_llama,
        lambda p, **kw: _settings(p, whole_layers=True, distribution=(100.0, 0.0, 0.0), **kw),
        mode="exact",
    )
    assert {c["kind"] for r in records for c in r.candidates} == {"attention", "mlp", "layer"}


def _search_equals_brute_force(model, make_settings, mode, head_bound_top_k: int = 16):
    """Run the search, then at each step brute force every candidate with a full forward from the step's
    base plan: the same perplexities, the same choice, and every eliminated candidate provably worse."""
    prunable = PrunableModel.prepare(model, weight_reorder=True)
    tokens = _calibration(model.config.vocab_size, n=6)
    loss = LossSettings(ignore_index=5, batch_size=2, head_bound_top_k=head_bound_top_k)
    scorers = {
        "block": CalibrationScorer(prunable, tokens, loss),
        "width": CalibrationScorer(prunable, tokens[:4], loss),
    }
    settings = make_settings(prunable, search=mode)
    records = []
    run_search(prunable, scorers, settings, on_step=lambda rec, plan: records.append(rec), progress=False)
    assert records
    plan = initial_plan(prunable.layout, settings)
    for rec in records:
        stage = next(s for s in STAGES if s.name == rec.stage)
        data = tokens if stage.calibration == "block" else tokens[:4]
        brute = []
        for cand in rec.candidates:
            with prunable.trial(Candidate.from_dict(cand).apply(plan)):
                brute.append(full_forward_perplexity(model, data, loss))
        scored = [k for k, c in enumerate(rec.candidates) if c["ppl"] is not None]
        assert [rec.candidates[k]["ppl"] for k in scored] == pytest.approx(
            [brute[k] for k in scored], rel=1e-5
        )
        if mode == "off":
            assert len(scored) == len(brute) and rec.skipped_batches == 0
        brute_choice = rec.candidates[min(range(len(brute)), key=lambda k: (brute[k], k))]
        assert Candidate.from_dict(brute_choice) == Candidate.from_dict(rec.choice)
        # an eliminated candidate is provably worse than the choice
        assert all(brute[k] > rec.choice["ppl"] * (1 - 1e-5) for k in range(len(brute)) if k not in scored)
        plan = Candidate.from_dict(rec.choice).apply(plan)
    return records


def test_stage_targets_and_overshoot(tiny_llama):
    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=True)
    tokens = _calibration(tiny_llama.config.vocab_size, n=2, seqlen=16)
    loss = LossSettings(batch_size=2)
    scorers = {
        "block": CalibrationScorer(prunable, tokens, loss),
        "width": CalibrationScorer(prunable, tokens, loss),
    }
    settings = _settings(prunable, target_ratio=30.0, distribution=(50, 50, 0))
    records = []
    run_search(prunable, scorers, settings, on_step=lambda rec, plan: records.append(rec), progress=False)
    t_block, t_mlp, t_all = settings.stage_targets(settings.target_ratio)
    assert (t_block, t_mlp, t_all) == pytest.approx((15.0, 30.0, 30.0))
    blocks = [r for r in records if r.stage == "block"]
    mlp = [r for r in records if r.stage == "mlp_width"]
    # a stage keeps going while below its target, and stops at the first step at/over it
    assert all(r.ratio < t_block for r in blocks[:-1]) and blocks[-1].ratio >= t_block
    assert all(r.ratio < t_mlp for r in mlp[:-1]) and mlp[-1].ratio >= t_mlp
    assert not [r for r in records if r.stage == "attn_width"]  # 0 share: already at target
    assert [r.ratio for r in records] == sorted(r.ratio for r in records)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(target_ratio=0.0), "target ratio"),
        (dict(target_ratio=100.0), "target ratio"),
        (dict(distribution=(1.0, -1.0, 1.0)), "distribution"),
        (dict(distribution=(1.0, 1.0)), "distribution"),
        (dict(mlp_group_size=96), "leaves nothing of the width 96"),
        (dict(attention_group_size=16), "whole KV groups"),  # llama_gqa: units of 4 heads x 8 dims = 32
        (
            dict(channel_importance="gradients"),
            "unknown channel importance 'gradients'",
        ),  # a hand-edited run.json
        (dict(objective="mse"), "unknown objective 'mse'"),
        (dict(finalists=0), "--finalists must be at least 1"),
        (dict(finalist_margin=-0.1), "--finalist-margin"),
    ],
)
def test_bad_settings_fail_fast(tiny_llama, kw, message):
    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=False)
    with pytest.raises(SearchConfigError, match=message):
        _settings(prunable, **kw).validate(prunable.layout)


@pytest.mark.parametrize(
    "published",
    [
        # (the published command's MLP width, its group): the tiny model's 96 / 40 leaves the same kind of
        # remainder (less than one group) that both leave: 18944 = 18 x 1024 + 512, 8192 = 10 x 768 + 512
        ("Qwen2.5-7B", 18944, 1024),
        ("Llama-3.2-3B", 8192, 768),
    ],
)
def test_group_sizes_that_do_not_divide_the_width_follow_the_reference(tiny_llama, token_ids, published):
    """The reference shrinks a width by the group while something remains; its published plans hold such widths."""
    from multipruner import extract

    name, width, group = published
    assert 0 < width % group < group and 0 < 96 % 40 < 40
    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=True)
    tokens = _calibration(tiny_llama.config.vocab_size, n=2, seqlen=16)
    loss = LossSettings(batch_size=2)
    scorers = {kind: CalibrationScorer(prunable, tokens, loss) for kind in ("block", "width")}
    settings = _settings(prunable, target_ratio=25.0, distribution=(0, 100, 0), mlp_group_size=40)
    settings.validate(prunable.layout)
    plans = []
    run_search(prunable, scorers, settings, on_step=lambda rec, plan: plans.append(plan), progress=False)
    widths = set(plans[-1].mlp_width)
    assert widths <= {96, 56, 16} and widths & {56, 16}
    # a published-style plan (a width that is the remainder) reads and extracts like any other
    plan = PruningPlan.from_reference({"pruned_mlp_width": {"1": 16, "2": 56}}, prunable.layout)
    with prunable.trial(plan):
        masked = tiny_llama(token_ids).logits
    pruned = extract(prunable, plan)
    assert pruned.model.layers[1].mlp.down_proj.in_features == 16
    assert torch.allclose(pruned(token_ids).logits, masked, atol=1e-5)


def test_a_step_where_every_candidate_is_inf_or_nan_fails_clearly(tiny_llama, monkeypatch):
    """The reference then picks arbitrarily (and crashes later); we stop and say why."""
    from multipruner.search.loop import SearchDivergedError
    from multipruner.search.scoring import StepScores

    def diverged(self, plans, *args, **kwargs):
        n = len(plans)
        bad = [math.inf, math.nan] * n
        return StepScores(bad[:n], bad[:n], [2] * n, [torch.zeros(2)] * n, 0, n)

    assert StepScores([math.nan, 3.0, math.inf], [0.0] * 3, [1] * 3, [], 0, 3).best() == 1  # NaN never wins
    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=False)
    tokens = _calibration(tiny_llama.config.vocab_size, n=2, seqlen=16)
    scorers = {
        kind: CalibrationScorer(prunable, tokens, LossSettings(batch_size=2)) for kind in ("block", "width")
    }
    monkeypatch.setattr(CalibrationScorer, "score", diverged)
    with pytest.raises(SearchDivergedError, match="step 0 \\(block\\): every candidate has a non-finite"):
        run_search(prunable, scorers, _settings(prunable), progress=False)


def test_reference_ratio_accounting_keeps_removed_blocks_norms_and_stops_a_step_later(tiny_llama):
    """The authors' code keeps counting a removed block's norm; at a target between the two counts it takes
    one more step (the 8.929 % / 100:0:0 case on SmolLM2, here on a tiny model with a hand count)."""
    from multipruner import PruningPlan

    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=False)
    layout = prunable.layout
    plan = PruningPlan.dense(layout).without_block("attention", 1).without_block("mlp", 2)
    # Llama: one RMSNorm of hidden_size (64) weights per branch, outside the branch's module
    assert plan.num_params(layout, "reference") - plan.num_params(layout) == 2 * 64
    tokens = _calibration(tiny_llama.config.vocab_size, n=2, seqlen=16)
    loss = LossSettings(batch_size=2)
    scorers = {kind: CalibrationScorer(prunable, tokens, loss) for kind in ("block", "width")}
    records = {}
    first = []
    run_search(
        prunable,
        scorers,
        _settings(prunable, target_ratio=1.0, distribution=(100, 0, 0)),
        on_step=lambda rec, p: first.append(p),
        progress=False,
    )
    exact_r, reference_r = first[0].ratio(layout), first[0].ratio(layout, "reference")
    assert reference_r < exact_r
    target = (exact_r + reference_r) / 2  # reached by one removal in our count, not in the reference's
    for accounting in ("exact", "reference"):
        records[accounting] = steps = []
        settings = _settings(
            prunable, target_ratio=target, distribution=(100, 0, 0), ratio_accounting=accounting
        )
        run_search(prunable, scorers, settings, on_step=lambda rec, p, s=steps: s.append(rec), progress=False)
    assert len(records["exact"]) == 1 and len(records["reference"]) == 2
    assert records["reference"][0].choice == records["exact"][0].choice


def test_cross_step_reuse_is_exact_and_saves_work(tiny_model):
    import dataclasses

    from multipruner.search.objective import LossSettings

    tokens = _calibration(tiny_model.config.vocab_size, n=4, seqlen=16)
    runs = {}
    for budget in (0.0, 1e-4, 2048.0):  # off, every few layers (tight budget), everything
        prunable = PrunableModel.prepare(tiny_model, weight_reorder=False)
        loss = dataclasses.replace(LossSettings(batch_size=2), reuse_budget_mb=budget)
        scorers = {
            "block": CalibrationScorer(prunable, tokens, loss),
            "width": CalibrationScorer(prunable, tokens, loss),
        }
        records = []
        run_search(
            prunable,
            scorers,
            _settings(prunable),
            on_step=lambda rec, plan, out=records: out.append(rec),
            progress=False,
        )
        prunable.restore()
        runs[budget] = (
            [(r.choice, [c["ppl"] for c in r.candidates]) for r in records],
            sum(s.layers_run for s in scorers.values()),
        )
    assert runs[0.0][0] == runs[1e-4][0] == runs[2048.0][0]  # bit-identical scores and choices
    assert runs[2048.0][1] < runs[1e-4][1] <= runs[0.0][1]


def test_exact_racing_bound_keeps_ties_and_drops_only_sure_losers():
    partial = {0: 3.0, 1: 5.0, 2: 5.0000001, 3: 0.0}
    assert exact_survivors(partial, bound=5.0) == {0, 1, 3}  # a tie with the finished leader survives


def test_paired_test_keeps_the_leader_and_close_candidates():
    torch.manual_seed(0)
    base = torch.rand(8) * 2 + 3
    nll = {
        0: base + 0.5 + 0.01 * torch.randn(8),  # consistently worse: dropped
        1: base,  # the leader
        2: base + 0.05 * torch.randn(8),  # within noise of the leader: kept
        3: base + 5.0,  # far worse
    }
    assert paired_survivors(nll, z=3.0) == {1, 2}
    assert paired_survivors({7: base}, z=3.0) == {7}


@pytest.fixture(scope="module")
def counting_llama():
    """A tiny Llama trained for a few steps to continue x, x+1, x+2, ...: unlike a random model, its
    blocks matter, so some candidates of a block step are far worse than others (as in real models)."""
    import copy

    from conftest import TINY_MODELS

    torch.manual_seed(0)
    model = TINY_MODELS["llama_gqa"]()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(25):
        ids = _counting_sequences(model.config.vocab_size, 8, seed=None)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().requires_grad_(False)
    return lambda: copy.deepcopy(model)


def _counting_sequences(vocab: int, n: int, seed: int | None, seqlen: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return (torch.randint(0, vocab, (n, 1), generator=generator) + torch.arange(seqlen)) % vocab


def _block_step(model, head_bound_top_k: int = 16):
    """The plans of the first block step, with a scorer over 4 batches."""
    prunable = PrunableModel.prepare(model, weight_reorder=False)
    tokens = _counting_sequences(model.config.vocab_size, 8, seed=3)
    loss = LossSettings(batch_size=2, head_bound_top_k=head_bound_top_k)
    scorer = CalibrationScorer(prunable, tokens, loss)
    settings = _settings(prunable)
    plan = initial_plan(prunable.layout, settings)
    cands = STAGES[0].candidates(plan, settings)
    return scorer, [c.apply(plan) for c in cands], [c.layer for c in cands]


@pytest.mark.parametrize("mode, head_bound_top_k", [("exact", 0), ("exact", 16), ("fast", 0), ("fast", 16)])
def test_racing_choice_equals_full_scoring_with_the_worst_candidate_first(
    counting_llama, mode, head_bound_top_k
):
    scorer, plans, layers = _block_step(counting_llama(), head_bound_top_k)
    full = scorer.score(plans, layers, race=RaceSettings(mode="off"))
    worst = max(range(len(plans)), key=lambda k: full.ppl[k])
    order = [worst] + [k for k in range(len(plans)) if k != worst]
    plans, layers = [plans[k] for k in order], [layers[k] for k in order]
    expected = [full.ppl[k] for k in order]
    raced = scorer.score(plans, layers, race=RaceSettings(mode=mode))
    assert raced.best() == min(range(len(plans)), key=lambda k: (expected[k], k))
    for k, ppl in enumerate(raced.ppl):
        if ppl is not None:
            assert ppl == pytest.approx(expected[k], rel=1e-9)
    assert raced.ppl[0] is None
    # without the head bound the worst is dropped by partial sums; with it, its LM head is never paid
    assert (raced.skipped_batches if head_bound_top_k == 0 else raced.bounded_batches) > 0


@pytest.mark.parametrize("rule", [FinalistRule(1), FinalistRule(3), FinalistRule(2, margin=0.05)])
def test_a_screen_paying_only_the_heads_that_may_be_finalists_picks_what_exact_screening_picks(
    counting_llama, rule
):
    scorer, plans, layers = _block_step(counting_llama())
    full = scorer.score(plans, layers, race=RaceSettings(mode="off"))
    screened = scorer.score(plans, layers, finalists=rule)
    assert rule.pick(screened.sequence_lower) == rule.pick(full.sequence_nll)
    for k in rule.pick(full.sequence_nll):
        assert torch.equal(screened.sequence_lower[k], full.sequence_nll[k])
        assert screened.ppl[k] == pytest.approx(full.ppl[k], rel=1e-9)
    for lower, exact in zip(screened.sequence_lower, full.sequence_nll, strict=True):
        assert (lower <= exact + 1e-5).all()  # the far candidates keep a bound, never more than their loss
    assert screened.bounded_batches > 0  # and their heads were never paid


def test_exact_racing_with_tied_candidates_keeps_the_first(counting_llama):
    scorer, plans, layers = _block_step(counting_llama())
    full = scorer.score(plans, layers, race=RaceSettings(mode="off"))
    best = full.best()
    # the same plan three times: a three-way tie for the best, which must go to the lowest index
    tied = [plans[k] for k in range(len(plans)) if k != best] + [plans[best]] * 3
    tied_layers = [layers[k] for k in range(len(plans)) if k != best] + [layers[best]] * 3
    raced = scorer.score(tied, tied_layers, race=RaceSettings(mode="exact"))
    assert raced.best() == len(plans) - 1


@pytest.mark.parametrize("eos, ignored", [(0, None), (2, 2), (None, None)])
def test_the_loss_leaves_out_the_eos_label_unless_its_id_is_0(eos, ignored, tiny_llama):
    """The reference's ``if pad_token_id:`` treats EOS id 0 as no id: then every label counts."""
    from types import SimpleNamespace

    assert ignored_label(SimpleNamespace(eos_token_id=eos)) == ignored
    ids = torch.tensor([[5, 0, 7, 0, 9, 2, 4, 0]])
    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=False)
    settings = LossSettings(ignore_index=ignored, batch_size=1)
    scored = CalibrationScorer(prunable, ids, settings, "cpu").perplexity()
    assert scored == pytest.approx(full_forward_perplexity(tiny_llama, ids, settings), rel=1e-5)
    if eos == 0:  # label 0 counts: not the perplexity that leaves it out
        without_zeros = full_forward_perplexity(tiny_llama, ids, LossSettings(ignore_index=0, batch_size=1))
        assert scored != pytest.approx(without_zeros, rel=1e-3)
