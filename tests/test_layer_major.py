"""Layer-major scoring (candidates past their own layer share one call per layer) gives the scores of
candidate-by-candidate scoring, step after step (cross-step reuse included), on every tiny family."""

from __future__ import annotations

import pytest
from test_search import _calibration, _settings

from multipruner import PrunableModel
from multipruner.search.scoring import CalibrationScorer, LossSettings
from multipruner.search.loop import run_search


def _search(model, budget_mb: float, mode: str):
    """Every step's candidate perplexities and choice, with layer-major scoring at ``budget_mb``."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    prunable = PrunableModel.prepare(model, weight_reorder=True)
    tokens = _calibration(model.config.vocab_size, n=6)
    loss = LossSettings(ignore_index=5, batch_size=2, layer_major_budget_mb=budget_mb)
    scorers = {
        "block": CalibrationScorer(prunable, tokens, loss),
        "width": CalibrationScorer(prunable, tokens[:4], loss),
    }
    records = []
    plan = run_search(
        prunable,
        scorers,
        _settings(prunable, search=mode),
        on_step=lambda r, p: records.append(r),
        progress=False,
    )
    prunable.restore()
    model.load_state_dict(state)  # the next search starts from the same dense weights
    return plan, records, sum(s.layers_run for s in scorers.values())


@pytest.mark.parametrize("mode", ["off", "exact"])
def test_layer_major_scores_equal_candidate_by_candidate(tiny_model, mode):
    plan, records, _ = _search(tiny_model, 0, mode)
    for budget in (1e-6, 1e9):  # one candidate per call (the chunking path), and all in one call
        plan_lm, records_lm, _ = _search(tiny_model, budget, mode)
        assert plan_lm == plan
        for a, b in zip(records, records_lm, strict=True):
            assert a.choice["kind"] == b.choice["kind"] and a.choice["layer"] == b.choice["layer"]
            for ca, cb in zip(a.candidates, b.candidates, strict=True):
                assert (ca["ppl"] is None) == (cb["ppl"] is None)
                if ca["ppl"] is not None:
                    assert cb["ppl"] == pytest.approx(ca["ppl"], rel=1e-5)


def test_layer_major_runs_the_same_number_of_layer_forwards(tiny_llama):
    # the saving is in how layers are called (fewer, larger calls), never in what is computed
    _, _, plain = _search(tiny_llama, 0, "exact")
    _, _, joint = _search(tiny_llama, 1e9, "exact")
    assert plain == joint


def test_the_prune_command_with_layer_major_scoring_gives_the_same_run(
    tiny_model_dir, calibration_txt, tmp_path
):
    import json

    from conftest import prune_args

    from multipruner.cli import main

    runs = {}
    for budget in ("0", "64"):
        run = tmp_path / f"run-{budget}"
        assert main(prune_args(tiny_model_dir, run, calibration_txt, "--layer-major-mb", budget)) == 0
        runs[budget] = json.loads((run / "plan.json").read_text())
    assert runs["0"] == runs["64"]
