"""Layer-major scoring (candidates past their own layer share one call per layer) gives the scores of
candidate-by-candidate scoring, step after step (cross-step reuse included), on every tiny family."""

from __future__ import annotations

import pytest
import torch
from test_search import _block_step, _calibration, _settings

from multipruner import PrunableModel
from multipruner.search.layer_major import (
    activation_width,
    candidates_per_call,
    repeat_batch,
    run_tails_layer_major,
)
from multipruner.search.loop import run_search
from multipruner.search.objective import LossSettings, NllObjective
from multipruner.search.recorder import LayerInputRecorder
from multipruner.search.scoring import CalibrationScorer
from multipruner.search.tails import Tail, run_tails_one_by_one


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


def test_layer_major_tails_equal_one_by_one_tails_also_when_restarted_past_their_own_layer(tiny_model):
    """The strategy on its own: the same final states, kept states, per-sequence NLL and layer count as
    running each tail alone; a tail restarted from a kept state (as reuse does) ends where the full one did."""
    scorer, plans, layers = _block_step(tiny_model)
    p = scorer.prunable
    ids = scorer.tokens[:2]
    objective = NllObjective(p.model, p.adapter, scorer.settings)
    with torch.inference_mode():
        with LayerInputRecorder(p.adapter.layers(p.model)) as recorder:
            p.adapter.decoder(p.model)(input_ids=ids, use_cache=False)
        tails = [Tail(k, layer, recorder.inputs[layer], {}) for k, layer in enumerate(layers)]
        alone, ran_alone = run_tails_one_by_one(p, recorder.kwargs, tails, plans, _keep_all)
        # every candidate that kept a state past its own layer restarts from its deepest one
        restarted = [
            Tail(tail.candidate, max(kept), kept[max(kept)], kept) if kept else tail
            for tail, (_, kept) in zip(tails, alone, strict=True)
        ]
        assert any(t.start > layers[t.candidate] for t in restarted)
        for chunk in (1, 3, len(tails)):
            for run in (tails, restarted):
                joint, ran = run_tails_layer_major(
                    p, recorder.kwargs, run, layers, plans, 2, chunk, _keep_all
                )
                for (normed, kept), (normed_lm, kept_lm), tail in zip(alone, joint, run, strict=True):
                    assert torch.allclose(normed_lm, normed, rtol=1e-5, atol=1e-5)
                    assert set(kept_lm) == {m for m in kept if m > tail.start}
                    nll = objective.per_sequence(normed, ids, slice(None))
                    assert objective.per_sequence(normed_lm, ids, slice(None)) == pytest.approx(
                        nll.tolist(), rel=1e-5
                    )
                if run is tails:
                    assert ran == ran_alone


def _keep_all(index: int) -> bool:
    return True


def test_repeated_call_arguments_stack_only_batch_leading_tensors():
    batch = 2
    kwargs = {
        "mask": torch.zeros(batch, 1, 5, 5),
        "rotary": (torch.ones(batch, 5, 8), torch.ones(batch, 5, 8)),
        "cache_position": torch.arange(5),
        "other": torch.zeros(1, 5),  # 2-D but not batch-leading
        "flag": True,
    }
    out = repeat_batch(kwargs, 3, batch)
    assert out["mask"].shape == (6, 1, 5, 5) and [r.shape for r in out["rotary"]] == [(6, 5, 8)] * 2
    assert out["cache_position"] is kwargs["cache_position"] and out["other"] is kwargs["other"]
    assert out["flag"] is True and isinstance(out["rotary"], tuple)
    assert repeat_batch(kwargs, 1, batch) is kwargs


def test_candidates_per_call_fill_the_budget_and_never_drop_to_zero(tiny_llama):
    layout = PrunableModel.prepare(tiny_llama, weight_reorder=False).layout
    shape = torch.Size([2, 16])
    one_mb = 2 * 16 * activation_width(layout) * 4 / 2**20  # one candidate's widest activation, fp32
    assert candidates_per_call(layout, shape, 4, 10 * one_mb) == 10
    assert candidates_per_call(layout, shape, 4, 0.5 * one_mb) == 1
    assert candidates_per_call(layout, shape, 2, 10 * one_mb) == 20  # half the bytes, twice the candidates
