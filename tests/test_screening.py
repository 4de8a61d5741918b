"""Screen, then decide: with every candidate a finalist the search is exact scoring on the decision set;
the screening leader always goes on; the proxy screen measures what the dropped channels carry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import prune_args
from test_search import _calibration, _search_equals_brute_force, _settings

from multipruner import PrunableModel
from multipruner.cli import main
from multipruner.search.kl_objective import DenseTargets, KlObjective
from multipruner.search.loop import initial_plan, run_search
from multipruner.search.objective import LossSettings
from multipruner.search.racing import RaceSettings
from multipruner.search.scoring import CalibrationScorer
from multipruner.search.screening import FinalistRule, width_proxy_scores
from multipruner.search.stages import STAGES, width_candidates


@pytest.mark.parametrize("mode", ["off", "exact"])
@pytest.mark.parametrize("width_screen", ["forward", "proxy"])
def test_every_candidate_a_finalist_equals_brute_force_on_the_decision_set(tiny_model, mode, width_screen):
    # the screening set is the first 2 of the 6 (block) and 4 (width) sequences of 24 tokens
    records = _search_equals_brute_force(
        tiny_model,
        lambda p, **kw: _settings(p, screen_tokens=48, finalists=1000, width_screen=width_screen, **kw),
        mode=mode,
    )
    assert all(r.finalists == list(range(len(r.candidates))) for r in records)
    assert all("screen_loss" in c for r in records for c in r.candidates)


def test_few_finalists_choose_the_best_of_them_on_the_decision_set(tiny_llama):
    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=True)
    tokens = _calibration(tiny_llama.config.vocab_size, n=6)
    loss = LossSettings(batch_size=2)
    scorers = {
        "block": CalibrationScorer(prunable, tokens, loss),
        "width": CalibrationScorer(prunable, tokens, loss),
    }
    records = []
    settings = _settings(prunable, screen_tokens=48, finalists=2, finalist_margin=0.01)
    run_search(prunable, scorers, settings, on_step=lambda rec, plan: records.append(rec), progress=False)
    for rec in records:
        screen = [c["screen_loss"] for c in rec.candidates]
        leader = min(range(len(screen)), key=lambda k: (screen[k], k))
        assert leader in rec.finalists
        assert len(rec.finalists) >= min(2, len(rec.candidates))
        near = {k for k, s in enumerate(screen) if s - screen[leader] <= 0.01}
        assert near <= set(rec.finalists)
        decided = {k: rec.candidates[k]["ppl"] for k in rec.finalists}
        assert all(c["ppl"] is None for k, c in enumerate(rec.candidates) if k not in rec.finalists)
        best = min((k for k in decided if decided[k] is not None), key=lambda k: (decided[k], k))
        assert rec.choice == {
            **{x: rec.candidates[best][x] for x in ("kind", "op", "layer", "width")},
            "ppl": decided[best],
        }


@pytest.mark.parametrize("objective", ["nll", "kl"])
@pytest.mark.parametrize("mode", ["off", "exact"])
def test_finalists_carrying_their_screen_losses_score_what_the_whole_decision_set_scores(
    tiny_llama, objective, mode
):
    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=False)
    tokens = _calibration(tiny_llama.config.vocab_size, n=6)
    loss = LossSettings(batch_size=2, head_bound_top_k=1)
    kl = None
    if objective == "kl":  # targets for the whole set: the rest's rows must read theirs, not the first
        targets = DenseTargets.compute(
            tiny_llama, prunable.adapter, tokens, top_k=4, batch_size=2, chunk_tokens=1024
        )
        kl = KlObjective(tiny_llama, prunable.adapter, loss, targets)
    whole = CalibrationScorer(prunable, tokens, loss, objective=kl)
    settings = _settings(prunable).resolved(prunable.layout)
    plan = initial_plan(prunable.layout, settings)
    cands = STAGES[0].candidates(plan, settings)
    plans, layers = [c.apply(plan) for c in cands], [c.layer for c in cands]
    race = RaceSettings(mode=mode)
    expected = whole.score(plans, layers, race=RaceSettings(mode="off"))

    screen, rest = whole.part(slice(0, 2)), whole.part(slice(2, None))
    screened = screen.score(plans, layers, finalists=FinalistRule(len(plans)))
    carried = rest.score(plans, layers, race=race, carried=screened.sequence_nll)
    assert carried.best() == expected.best()
    for k, ppl in enumerate(carried.ppl):
        if ppl is not None or mode == "off":
            assert ppl == pytest.approx(expected.ppl[k], rel=1e-6)
            assert carried.sequences[k] == 6
    # the rest's own batches only: the carried rows are never run again
    assert carried.total_batches == 2 * len(plans)


@pytest.mark.parametrize("seed", range(20))
def test_the_screening_leader_and_the_top_k_are_always_finalists(seed):
    g = torch.Generator().manual_seed(seed)
    n, sequences = 12, 5
    losses = [torch.rand(sequences, generator=g) * 3 for _ in range(n)]
    losses[seed % n] = torch.full((sequences,), float("nan"))  # a diverged candidate ranks last
    k = 1 + seed % 4
    margin = [0.0, 0.2][seed % 2]
    picked = FinalistRule(k, margin).pick(losses)
    means = [t.mean().item() if not t.isnan().any() else float("inf") for t in losses]
    ranked = sorted(range(n), key=lambda i: (means[i], i))
    assert ranked[0] in picked and set(ranked[:k]) <= set(picked)
    assert set(picked) == set(ranked[:k]) | {i for i in range(n) if means[i] - means[ranked[0]] <= margin}
    assert picked == sorted(picked)


def test_the_proxy_is_zero_for_channels_that_carry_nothing_and_grows_with_them(tiny_llama):
    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=False)
    layout, adapter = prunable.layout, prunable.adapter
    settings = _settings(prunable).resolved(layout)
    group = settings.mlp_group_size
    down = getattr(adapter.mlp_module(adapter.layers(tiny_llama)[1]), adapter.mlp_out_proj)
    with torch.no_grad():
        down.weight[:, -group:] = 0.0  # layer 1's last group adds nothing to the residual stream
    plan = initial_plan(layout, settings)
    candidates = width_candidates("mlp")(plan, settings)
    tokens = _calibration(tiny_llama.config.vocab_size, n=3)
    prunable.apply(plan)
    scores = width_proxy_scores(prunable, candidates, tokens, 2, torch.device("cpu"))
    assert scores[1].item() == 0.0 and all(s.item() > 0 for k, s in enumerate(scores) if k != 1)
    with torch.no_grad():
        down.weight[:, -group:] = 1e-3
    small = width_proxy_scores(prunable, candidates, tokens, 2, torch.device("cpu"))[1].item()
    with torch.no_grad():
        down.weight[:, -group:] = 2e-3
    double = width_proxy_scores(prunable, candidates, tokens, 2, torch.device("cpu"))[1].item()
    assert double == pytest.approx(4 * small, rel=1e-4)  # a squared size: twice the weights, four times


def test_a_run_killed_between_screening_and_deciding_resumes_to_the_same_plan(
    tiny_model_dir, calibration_txt, tmp_path
):
    screened = ("--screen-tokens", "16", "--finalists", "2")
    reference, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    assert main(prune_args(tiny_model_dir, reference, calibration_txt, *screened, by_tokens=True)) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MULTIPRUNER_KILL_AT": "screened:3"}
    argv = prune_args(tiny_model_dir, killed, calibration_txt, *screened, by_tokens=True)
    proc = subprocess.run(
        [sys.executable, "-m", "multipruner.cli", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert main([*argv, "--resume"]) == 0
    steps = [
        [json.loads(x) for x in (r / "steps.jsonl").read_text().splitlines()[1:]] for r in (reference, killed)
    ]
    assert [s["choice"] for s in steps[0]] == [s["choice"] for s in steps[1]]
    assert [s["finalists"] for s in steps[0]] == [s["finalists"] for s in steps[1]]
    assert any(len(s["finalists"]) < len(s["candidates"]) for s in steps[0])  # the screen did choose
    assert (killed / "pruning_config.json").read_text() == (reference / "pruning_config.json").read_text()


def test_prune_with_kl_proxy_screen_and_finalists_runs_end_to_end(tiny_model_dir, calibration_txt, tmp_path):
    run = tmp_path / "run"
    flags = ("--objective", "kl", "--screen-tokens", "16", "--finalists", "2", "--width-screen", "proxy")
    assert main(prune_args(tiny_model_dir, run, calibration_txt, *flags, "--extract", by_tokens=True)) == 0
    steps = [json.loads(x) for x in (run / "steps.jsonl").read_text().splitlines()[1:]]
    assert steps and all(len(s["finalists"]) >= 1 for s in steps)
    assert "exp(KL to the dense model)" in (run / "report.md").read_text()
    assert (run / "model" / "model.safetensors").is_file()


def test_the_reference_importance_metric_selects_its_exact_perplexity_scoring(
    tiny_model_dir, calibration_txt, tmp_path
):
    runs = {}
    for name, extra in (("reference", ("--importance_metric", "ppl")), ("default", ())):
        run = tmp_path / name
        assert main(prune_args(tiny_model_dir, run, calibration_txt, *extra, by_tokens=True)) == 0
        runs[name] = (
            json.loads((run / "run.json").read_text())["settings"]["search"],
            [json.loads(x) for x in (run / "steps.jsonl").read_text().splitlines()[1:]],
        )
    search, steps = runs["reference"]
    assert (search["objective"], search["screen_tokens"], search["width_screen"]) == ("nll", 0, "forward")
    assert all(
        s.get("finalists") is None and all(c["ppl"] is not None or c["sequences"] for c in s["candidates"])
        for s in steps
    )
    search, steps = runs["default"]
    assert (search["objective"], search["width_screen"]) == ("kl-block", "forward")
    # the tiny sets (64 and 32 tokens) are no larger than the default 1,024-token screen: no step screens,
    # every candidate is scored on its whole set
    assert all(s["finalists"] is None and all("screen_loss" not in c for c in s["candidates"]) for s in steps)
