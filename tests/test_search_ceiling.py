"""benchmarks/search_ceiling.py: the work it counts for a step, against a hand count."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "search_ceiling", Path(__file__).resolve().parents[1] / "benchmarks" / "search_ceiling.py"
)
ceiling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ceiling)


def _cand(layer, kind="attention", sequences=4):
    return {"kind": kind, "op": "remove", "layer": layer, "sequences": sequences}


def _step(layers, chosen, stage="block"):
    cands = [_cand(i) for i in layers]
    return {"stage": stage, "candidates": cands, "choice": dict(_cand(chosen))}


def test_step_work_counts_tails_head_and_racing_by_hand():
    # 4 layers, head = 1 layer, 4 sequences in batches of 2; candidates change layers 0, 1, 2; 2 wins
    full, tails, raced = ceiling.step_work(_step([0, 1, 2], chosen=2), None, layers=4, head=1.0, batch_size=2)
    assert full == 3 * 4 * (4 + 1)
    assert tails == 4 * 4 + 4 * 3 + 4 * 2 + 4 * 1  # every tail, and the winner's head only
    assert raced == 2 * 4 + 2 * 3 + 4 * (2 + 1)  # losers stop after one batch of 2 sequences


def test_step_work_reuses_states_up_to_the_previous_change():
    previous = _step([0, 1, 2, 3], chosen=1)
    step = _step([0, 2, 3], chosen=3)
    _, tails, _ = ceiling.step_work(step, previous, layers=4, head=0.0, batch_size=2)
    # candidate 0 was scored last step: it restarts at layer 1 (the change), not at 0
    assert tails == 4 * (4 - 1) + 4 * (4 - 2) + 4 * (4 - 3)
    # across stages nothing is reused (another calibration set)
    _, tails_other, _ = ceiling.step_work(step, {**previous, "stage": "mlp_width"}, 4, 0.0, 2)
    assert tails_other == 4 * 4 + 4 * 2 + 4 * 1


@pytest.mark.parametrize("untied", [False, True])
def test_head_in_layers_from_the_layout(untied):
    class Layout:
        hidden_size = 8
        non_layer_params = 100 * 8 * (2 if untied else 1) + 8  # vocabulary 100, final norm 8
        attention_width = 8
        mlp_width = 16

        def attention_params(self, width):
            return 4 * 8 * width

        def mlp_params(self, width):
            return 3 * 8 * width

    assert ceiling.head_in_layers(Layout(), untied) == pytest.approx(800 / (256 + 384))
