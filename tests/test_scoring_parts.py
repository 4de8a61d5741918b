"""The scorer's parts on their own: the layer-input recorder, the objective, cross-step reuse and the
torchrun exchange (the head bound and layer-major scoring have their own test files)."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from test_search import _calibration, _settings

from multipruner import PrunableModel
from multipruner.search.distributed import Workers
from multipruner.search.loop import initial_plan
from multipruner.search.objective import LossSettings, NllObjective
from multipruner.search.racing import RaceSettings
from multipruner.search.recorder import LayerInputRecorder, layer_output
from multipruner.search.recordings import carried_over, record
from multipruner.search.reuse import StepReuse, first_difference, keep_rule
from multipruner.search.scoring import CalibrationScorer
from multipruner.search.stages import STAGES, Candidate

# --- recordings carried across steps ---


@pytest.mark.parametrize("stage", [0, 1])  # a block step, an MLP-width step
def test_the_next_steps_recordings_are_the_winners_states_equal_to_a_forward(tiny_model, stage):
    prunable = PrunableModel.prepare(tiny_model, weight_reorder=True)
    tokens = _calibration(tiny_model.config.vocab_size, n=4)
    scorer = CalibrationScorer(prunable, tokens, LossSettings(batch_size=2))
    settings = _settings(prunable).resolved(prunable.layout)
    plan = initial_plan(prunable.layout, settings)
    prunable.apply(plan)
    cands = STAGES[stage].candidates(plan, settings)
    scores = scorer.score([c.apply(plan) for c in cands], [c.layer for c in cands], keys=cands)
    winner = cands[scores.best()].apply(plan)
    prunable.apply(winner)
    with torch.inference_mode():
        for b in range(2):
            derived = carried_over(scorer._recordings.get(b), winner, scorer._saved, b)
            assert derived is not None and derived.final is None  # no forward ran for it
            fresh = record(prunable, tokens[2 * b : 2 * b + 2])
            assert len(derived.inputs) == len(fresh.inputs)
            for got, want in zip(derived.inputs, fresh.inputs, strict=True):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(derived.current(prunable), fresh.final, atol=1e-5, rtol=1e-5)
    # a plan no candidate of the last step had (two of their changes at once): recorded again
    other = cands[scores.best() - 1].apply(winner)
    assert carried_over(scorer._recordings.get(0), other, scorer._saved, 0) is None


# --- recorder ---


def test_recorded_inputs_are_the_forwards_layer_inputs_and_replay_it(tiny_model, token_ids):
    prunable = PrunableModel.prepare(tiny_model, weight_reorder=False)
    adapter, layers = prunable.adapter, prunable.adapter.layers(tiny_model)
    with torch.inference_mode():
        with LayerInputRecorder(layers) as recorder:
            final = adapter.decoder(tiny_model)(input_ids=token_ids, use_cache=False).last_hidden_state
        assert all(not layer._forward_pre_hooks for layer in layers)  # the hooks left with the block
        manual = adapter.decoder(tiny_model)(input_ids=token_ids, use_cache=False, output_hidden_states=True)
        for i in range(len(layers)):
            assert torch.equal(recorder.inputs[i], manual.hidden_states[i])
        # each layer, called on its recorded input with its recorded arguments, gives the next one's input
        hidden = recorder.inputs[0]
        for i, layer in enumerate(layers):
            assert torch.equal(hidden, recorder.inputs[i])
            hidden = layer_output(layer(hidden, **recorder.kwargs[i]))
        assert torch.equal(adapter.final_norm(tiny_model)(hidden), final)


def test_layer_output_takes_the_hidden_states_out_of_a_tuple():
    states = torch.ones(2, 3)
    assert layer_output((states, None)) is states and layer_output(states) is states


# --- objective ---


@pytest.mark.parametrize("ignore_index", [None, 5])
def test_nll_objective_equals_cross_entropy_on_full_logits(tiny_model, token_ids, ignore_index):
    ids = token_ids.clone()
    ids[0, 4] = ids[1, 9] = 5  # a label to leave out
    prunable = PrunableModel.prepare(tiny_model, weight_reorder=False)
    # 7 does not divide the 38 positions: the last chunk is short
    settings = LossSettings(ignore_index=ignore_index, chunk_tokens=7)
    objective = NllObjective(tiny_model, prunable.adapter, settings)
    with torch.inference_mode():
        normed = prunable.adapter.decoder(tiny_model)(input_ids=ids, use_cache=False).last_hidden_state
        got = objective.per_sequence(normed, ids, slice(None))
        logits = tiny_model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    labels = ids[:, 1:]
    token_nll = F.cross_entropy(logits.permute(0, 2, 1), labels, reduction="none")
    keep = labels != (ignore_index if ignore_index is not None else -100)
    expected = (token_nll * keep).sum(dim=1) / keep.sum(dim=1)
    assert got.shape == (2,)
    assert got == pytest.approx(expected, rel=1e-5)
    if ignore_index is not None:  # leaving the label out changed the loss
        assert got != pytest.approx(token_nll.mean(dim=1), rel=1e-4)


def test_nll_objective_bound_is_below_its_loss(tiny_model, token_ids):
    prunable = PrunableModel.prepare(tiny_model, weight_reorder=False)
    objective = NllObjective(tiny_model, prunable.adapter, LossSettings(head_bound_top_k=2, chunk_tokens=16))
    with torch.inference_mode():
        current = prunable.adapter.decoder(tiny_model)(input_ids=token_ids, use_cache=False).last_hidden_state
        bound = objective.lower_bound(current, token_ids, slice(None))
        if tiny_model.config.model_type == "gemma2":
            assert bound is None  # soft-capped logits: no bound
            return
        moved = current + 0.5 * torch.randn(current.shape, generator=torch.Generator().manual_seed(0))
        gap = objective.per_sequence(moved, token_ids, slice(None)) - bound(moved)
    assert gap.min().item() >= -1e-5 and gap.max().item() > 0


# --- cross-step reuse ---


def _states(layers, tag: float) -> dict[int, torch.Tensor]:
    return {m: torch.full((1,), tag + m) for m in layers}


def test_a_tail_restarts_from_saved_states_only_up_to_the_first_changed_layer(tiny_llama):
    layout = PrunableModel.prepare(tiny_llama, weight_reorder=False).layout
    settings = _settings(PrunableModel.prepare(tiny_llama, weight_reorder=False))
    base = initial_plan(layout, settings)
    old = Candidate("mlp", "remove", 0).apply(base)  # the candidate at the last step
    new = Candidate("mlp", "remove", 0).apply(Candidate("attention", "remove", 2).apply(base))
    assert first_difference(old, new) == 2 and first_difference(new, new) == layout.num_layers
    saved = {"cand": (old, {0: _states([1, 2, 3], 0.0)})}
    reuse = StepReuse(saved, [new], [0], ["cand"], keep=lambda index: False)
    recorded = [torch.full((1,), -1.0 - i) for i in range(layout.num_layers)]
    tail = reuse.tail_start(0, 0, recorded)
    assert tail.start == 2 and torch.equal(tail.hidden, saved["cand"][1][0][2])  # layer 3's state is stale
    assert set(tail.reusable) == {1, 2}
    fresh_batch = reuse.tail_start(0, 1, recorded)  # nothing saved for this batch: its own layer
    assert fresh_batch.start == 0 and fresh_batch.hidden is recorded[0]
    # what it leaves for the next step: the valid states it started from, and what it kept on the way
    reuse.keep_states(tail, 0, {3: torch.zeros(1)})
    assert set(reuse.fresh["cand"][1][0]) == {1, 2, 3} and reuse.fresh["cand"][0] is new


def test_keep_rule_keeps_all_states_within_budget_and_fewer_beyond_it():
    first_layers, n_layers = [0, 1, 2, 3], 8
    wanted = sum(n_layers - 1 - f for f in first_layers) * 2 * 1.0  # 2 batches of 1 MB states
    kept = {
        budget: sum(keep_rule(budget, n_layers, first_layers, 2, 1.0)(i) for i in range(n_layers))
        for budget in (0.0, wanted, wanted / 3)
    }
    assert kept[0.0] == 0 and kept[wanted] == n_layers and 0 < kept[wanted / 3] <= n_layers / 3 + 1


def test_a_candidate_restarted_from_saved_states_scores_as_a_fresh_run_with_fewer_layers(tiny_model):
    prunable = PrunableModel.prepare(tiny_model, weight_reorder=False)
    tokens = _calibration(tiny_model.config.vocab_size, n=4, seqlen=16)
    settings = _settings(prunable)
    plan = initial_plan(prunable.layout, settings)
    cands = STAGES[0].candidates(plan, settings)
    reused = CalibrationScorer(prunable, tokens, LossSettings(batch_size=2))
    reused.score([c.apply(plan) for c in cands], [c.layer for c in cands], keys=cands)
    # the step chose its deepest candidate: the others' states up to that layer are still valid
    plan = max(cands, key=lambda c: c.layer).apply(plan)
    prunable.apply(plan)
    cands = STAGES[0].candidates(plan, settings)
    plans, layers = [c.apply(plan) for c in cands], [c.layer for c in cands]
    before = reused.layers_run
    again = reused.score(plans, layers, keys=cands)
    fresh = CalibrationScorer(prunable, tokens, LossSettings(batch_size=2))
    baseline = fresh.score(plans, layers, keys=cands)
    assert again.ppl == baseline.ppl  # bit for bit
    assert all(torch.equal(a, b) for a, b in zip(again.sequence_nll, baseline.sequence_nll, strict=True))
    assert reused.layers_run - before < fresh.layers_run


# --- the torchrun exchange, with threads standing in for processes ---


class _Room:
    """all_gather between threads: each puts its object in its slot, then all read every slot."""

    def __init__(self, size: int):
        self.slots: list = [None] * size
        self.barrier = threading.Barrier(size, timeout=120)

    def all_gather(self, rank: int, obj) -> list:
        self.slots[rank] = obj
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return out


@dataclass(frozen=True)
class _ThreadWorkers(Workers):
    room: _Room = field(default=None, compare=False)

    def all_gather(self, obj):
        return self.room.all_gather(self.rank, obj)


@pytest.mark.parametrize("mode, top_k", [("off", 16), ("exact", 0), ("exact", 1), ("fast", 1)])
def test_two_processes_sharing_a_step_find_what_one_process_finds(tiny_llama, mode, top_k):
    tokens = _calibration(tiny_llama.config.vocab_size, n=6, seqlen=16)
    loss = LossSettings(batch_size=2, head_bound_top_k=top_k)
    race = RaceSettings(mode=mode, min_sequences=2)
    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=False)
    settings = _settings(prunable)
    plan = initial_plan(prunable.layout, settings)
    cands = STAGES[0].candidates(plan, settings)
    plans, layers = [c.apply(plan) for c in cands], [c.layer for c in cands]
    one = CalibrationScorer(prunable, tokens, loss).score(plans, layers, race=race)
    room, found, errors = _Room(2), [None, None], []

    def process(rank: int) -> None:
        try:
            own = PrunableModel.prepare(copy.deepcopy(tiny_llama), weight_reorder=False)
            scorer = CalibrationScorer(own, tokens, loss, workers=_ThreadWorkers(rank, 2, room))
            found[rank] = scorer.score(plans, layers, race=race)
        except Exception as error:  # noqa: BLE001 - reported by the test below
            errors.append(error)
            room.barrier.abort()

    threads = [threading.Thread(target=process, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for two in found:
        assert two.ppl == one.ppl and two.best() == one.best()
        assert two.skipped_batches == one.skipped_batches and two.bounded_batches == one.bounded_batches
        assert sum(two.batches_by_process) == one.total_batches - one.skipped_batches
        assert min(two.batches_by_process) > 0  # candidates of odd and even layers: both did work
    assert found[0].batches_by_process == found[1].batches_by_process
