"""The search picks what brute force picks, stops where ALGORITHM.md says, and rejects bad settings."""

from __future__ import annotations

import pytest
import torch

from multipruner import prepare_dense
from multipruner.scoring import CalibrationScorer, LossSettings, full_forward_perplexity
from multipruner.search import STAGES, Candidate, SearchConfigError, SearchSettings, initial_plan, run_search


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
    )
    base.update(kw)
    return SearchSettings(**base)


def test_every_step_matches_brute_force(tiny_model):
    prunable = prepare_dense(tiny_model, weight_reorder=True)
    tokens = _calibration(tiny_model.config.vocab_size)
    loss = LossSettings(ignore_index=5, batch_size=3)
    scorers = {
        "block": CalibrationScorer(prunable, tokens, loss),
        "width": CalibrationScorer(prunable, tokens[:2], loss),
    }
    settings = _settings(prunable)
    records = []
    run_search(prunable, scorers, settings, on_step=lambda rec, plan: records.append(rec), progress=False)
    assert {r.stage for r in records} == {s.name for s in STAGES}
    # replay: at each step, brute force every candidate with a full forward from the step's base plan
    plan = initial_plan(prunable.layout, settings)
    for rec in records:
        stage = next(s for s in STAGES if s.name == rec.stage)
        data = tokens if stage.calibration == "block" else tokens[:2]
        brute = []
        for cand in rec.candidates:
            with prunable.trial(Candidate.from_dict(cand).apply(plan)):
                brute.append(full_forward_perplexity(tiny_model, data, loss))
        fast = [c["ppl"] for c in rec.candidates]
        assert fast == pytest.approx(brute, rel=1e-5)
        brute_choice = rec.candidates[min(range(len(brute)), key=lambda k: (brute[k], k))]
        assert Candidate.from_dict(brute_choice) == Candidate.from_dict(rec.choice)
        plan = Candidate.from_dict(rec.choice).apply(plan)


def test_stage_targets_and_overshoot(tiny_llama):
    prunable = prepare_dense(tiny_llama, weight_reorder=True)
    tokens = _calibration(tiny_llama.config.vocab_size, n=2, seqlen=16)
    loss = LossSettings(batch_size=2)
    scorers = {
        "block": CalibrationScorer(prunable, tokens, loss),
        "width": CalibrationScorer(prunable, tokens, loss),
    }
    settings = _settings(prunable, target_ratio=30.0, distribution=(50, 50, 0))
    records = []
    run_search(prunable, scorers, settings, on_step=lambda rec, plan: records.append(rec), progress=False)
    t_block, t_mlp, t_all = settings.stage_targets()
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
        (dict(mlp_group_size=7), "divide the MLP width"),
        (dict(attention_group_size=16), "whole KV groups"),  # llama_gqa: units of 4 heads x 8 dims = 32
    ],
)
def test_bad_settings_fail_fast(tiny_llama, kw, message):
    prunable = prepare_dense(tiny_llama, weight_reorder=False)
    with pytest.raises(SearchConfigError, match=message):
        _settings(prunable, **kw).validate(prunable.layout)


def test_cross_step_reuse_is_exact_and_saves_work(tiny_model):
    import dataclasses

    from multipruner.scoring import LossSettings

    tokens = _calibration(tiny_model.config.vocab_size, n=4, seqlen=16)
    runs = {}
    for budget in (0.0, 1e-4, 2048.0):  # off, every few layers (tight budget), everything
        prunable = prepare_dense(tiny_model, weight_reorder=False)
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
