"""The head bound is a lower bound on the exact next-token NLL for any hidden state, equals it at the current
model's states, and covers families with an LM-head bias; soft-capped logits get no bound."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from multipruner import PrunableModel
from multipruner.search.head_bound import HeadBound


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
