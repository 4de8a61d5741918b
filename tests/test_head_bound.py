"""The head bound is a lower bound on the exact next-token NLL for any hidden state, equals it at the current
model's states, and covers families with an LM-head bias; soft-capped logits get no bound. Lazy heads pay
the exact loss only for candidates whose bound may still win."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from multipruner import PrunableModel
from multipruner.search.head_bound import HeadBound, lazy_heads, pay_heads, settle
from multipruner.search.step_state import StepState


def _exact_token_nll(prunable, normed, ids):
    logits = prunable.adapter.logits_from_hidden(prunable.model, normed[:, :-1]).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")


def _check(model, ids, top_k):
    prunable = PrunableModel.prepare(model, weight_reorder=False)
    with torch.inference_mode():
        current = prunable.adapter.decoder(model)(input_ids=ids, use_cache=False).last_hidden_state
        bound = HeadBound.from_current(model, prunable.adapter, current, ids, top_k=top_k, chunk_tokens=16)
        if bound is None:
            return None
        # at the current model's own states the tail term is exact, so the bound is the loss
        assert bound.token_nll(current) == pytest.approx(_exact_token_nll(prunable, current, ids), abs=1e-4)
        gen = torch.Generator().manual_seed(0)
        gaps = []
        for scale in (0.05, 0.5, 2.0):
            moved = current + scale * torch.randn(current.shape, generator=gen)
            gap = _exact_token_nll(prunable, moved, ids) - bound.token_nll(moved)
            assert gap.min().item() >= -1e-4, f"bound above the loss at scale {scale}"
            gaps.append(gap.mean().item())
        return gaps


@pytest.mark.parametrize("top_k", [1, 4, 128])
def test_bound_is_below_the_loss_and_exact_at_the_current_states(tiny_model, token_ids, top_k):
    gaps = _check(tiny_model, token_ids, top_k)
    if tiny_model.config.model_type == "gemma2":
        assert gaps is None  # soft-capped logits are not linear in the hidden state
        return
    if top_k == 128:  # the subset is the whole vocabulary: nothing left to bound
        assert gaps == pytest.approx([0.0, 0.0, 0.0], abs=1e-4)
    else:  # it is a bound, not the loss: farther states leave more of the tail unaccounted for
        assert gaps[-1] > gaps[0] >= 0.0


def test_bound_with_an_lm_head_bias(tiny_llama, token_ids):
    head = tiny_llama.lm_head
    biased = nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.copy_(torch.randn(head.out_features) * 2.0)
    tiny_llama.lm_head = biased
    assert _check(tiny_llama, token_ids, top_k=2) is not None


def test_heads_are_put_off_only_when_selecting_with_a_bound_and_the_states_fit():
    fits = dict(candidates=10, state_values=2**20, dtype_bytes=2)  # 20 MB of final states
    assert lazy_heads(selecting=True, top_k=16, budget_mb=20.0, **fits)
    assert not lazy_heads(selecting=True, top_k=16, budget_mb=19.9, **fits)
    assert not lazy_heads(selecting=False, top_k=16, budget_mb=1e9, **fits)
    assert not lazy_heads(selecting=True, top_k=0, budget_mb=1e9, **fits)


def _bounded_state(exact: dict[int, float], bounds: dict[int, float]) -> StepState:
    """Candidates with an exact loss on one batch, and candidates with only a bound (their head put off)."""
    state = StepState(len(exact) + len(bounds), lazy=True, weight_dtype=torch.float32)
    for k, loss in exact.items():
        state.record_exact(k, 0, torch.tensor([loss]))
    for k, bound in bounds.items():
        state.record_bound(k, 0, torch.tensor([bound]), final_states=torch.tensor([bound + 0.5]))
    return state


def test_settle_pays_the_heads_of_candidates_that_may_win_lowest_bound_first():
    # exact: 0 at 10.0; bounded: 1 (9.0, exactly 9.5), 2 (9.4, exactly 9.9), 3 (11.0: out at once)
    state = _bounded_state({0: 10.0}, {1: 9.0, 2: 9.4, 3: 11.0})
    paid = []

    def finish(k: int) -> None:
        paid.append(k)
        pay_heads(state, k, lambda b, final_states: final_states)  # the "exact loss": bound + 0.5
        state.pending.discard(k)

    settle(state, {0, 1, 2, 3}, finish)
    # 1 first (lowest bound), then 2, still under the best total (9.5); 3's bound already loses
    assert paid == [1, 2]
    assert state.partial_sum(1) == 9.5 and state.partial_sum(2) == pytest.approx(9.9)
    assert state.pending == {3} and state.nll[3] == {} and state.lower_sum(3) == 11.0


def test_settle_stops_at_the_first_bound_above_the_best_total():
    state = _bounded_state({0: 5.0}, {1: 6.0, 2: 4.0})
    paid = []
    settle(state, {0, 1, 2}, paid.append)  # a finish that learns nothing: the best stays 5.0
    assert paid == [2]


def _paying(state: StepState, paid: list[int]):
    def finish(k: int) -> None:
        paid.append(k)
        pay_heads(state, k, lambda b, final_states: final_states)  # the "exact loss": bound + 0.5
        state.pending.discard(k)

    return finish


def test_settle_for_the_top_two_pays_until_the_second_best_total_beats_every_bound():
    # exact: 0 at 10.0; bounded (exactly bound + 0.5): 1 (9.5), 2 (9.9), 3 (10.45), 4 (11.5)
    state = _bounded_state({0: 10.0}, {1: 9.0, 2: 9.4, 3: 9.95, 4: 11.0})
    paid = []
    settle(state, {0, 1, 2, 3, 4}, _paying(state, paid), top=2)
    # after 1 and 2 the second best total is 9.9, below 3's bound: 3 and 4 cannot be in the top two
    assert paid == [1, 2]
    assert state.pending == {3, 4}


def test_settle_within_a_margin_pays_every_candidate_that_may_be_near_the_best():
    state = _bounded_state({0: 10.0}, {1: 9.0, 2: 10.05, 3: 10.2})
    paid = []
    settle(state, {0, 1, 2, 3}, _paying(state, paid), within=0.6)
    # the best becomes 9.5 (1): 2's bound (10.05) may be within 0.6 of it, 3's (10.2) may not
    assert paid == [1, 2]
    assert state.pending == {3}
