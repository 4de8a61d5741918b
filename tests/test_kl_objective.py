"""The KL objective against KL computed by hand from two tiny models' full logits."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB
from test_search import _calibration, _settings

from multipruner import PrunableModel
from multipruner.core.adapters import adapter_for
from multipruner.search.kl_objective import LOG_PROB_FLOOR, DenseTargets, KlObjective, coarse_kl
from multipruner.search.loop import initial_plan, run_search
from multipruner.search.objective import LossSettings
from multipruner.search.scoring import CalibrationScorer
from multipruner.search.stages import Candidate

ALL_ROWS = slice(None)


@pytest.fixture
def dense(tiny_llama):
    # a larger final norm sharpens the random model's near-uniform outputs, so a top-4 leaves a real tail
    with torch.no_grad():
        tiny_llama.model.norm.weight.mul_(8.0)
    return tiny_llama


@pytest.fixture
def candidate(dense):
    """The dense model with one MLP's output reversed and amplified: other final states (a KL of
    0.3-0.9 nats per token), the same LM head."""
    model = copy.deepcopy(dense)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(-10.0)
    return model


@pytest.fixture
def tokens():
    return torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(2))


def normed_states(model, ids):
    with torch.no_grad():
        return adapter_for(model).decoder(model)(input_ids=ids, use_cache=False).last_hidden_state


def full_log_probs(model, ids):
    with torch.no_grad():
        return F.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), dim=-1)


def objective(dense, tokens, top_k, **settings):
    adapter = adapter_for(dense)
    targets = DenseTargets.compute(dense, adapter, tokens, top_k=top_k, batch_size=3, chunk_tokens=7)
    return KlObjective(dense, adapter, LossSettings(**settings), targets)


def full_kl_per_position(dense, candidate, ids):
    log_p, log_q = full_log_probs(dense, ids), full_log_probs(candidate, ids)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # [batch, seqlen-1]


def test_targets_hold_the_dense_top_k_and_tail_mass(dense, tokens):
    log_p = full_log_probs(dense, tokens)
    targets = objective(dense, tokens, top_k=4).targets
    expected = log_p.topk(4, dim=-1)
    assert targets.top_ids.shape == (4, 9, 4) and targets.tail_logprob.shape == (4, 9)
    assert torch.equal(targets.top_ids.long(), expected.indices)
    torch.testing.assert_close(targets.top_logprobs, expected.values, atol=1e-5, rtol=0)
    tail_mass = 1 - expected.values.exp().sum(dim=-1)
    torch.testing.assert_close(targets.tail_logprob.exp(), tail_mass, atol=1e-6, rtol=1e-5)
    assert targets.nbytes == 4 * 9 * (4 * 4 + 4 * 4 + 4)


def test_whole_vocabulary_targets_give_the_full_kl(dense, candidate, tokens):
    kl = objective(dense, tokens, top_k=VOCAB + 5)  # more than the vocabulary: k is clamped, tail empty
    assert kl.targets.top_k == VOCAB and torch.isneginf(kl.targets.tail_logprob).all()

    own = kl.per_sequence(normed_states(dense, tokens), tokens, ALL_ROWS)
    assert own.dtype == torch.float32 and own.shape == (4,)
    assert own.abs().max() < 1e-5

    expected = full_kl_per_position(dense, candidate, tokens).mean(dim=1)
    assert expected.min() > 0.1  # the perturbation moves the outputs, so a zero KL would fail
    got = kl.per_sequence(normed_states(candidate, tokens), tokens, ALL_ROWS)
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # no tail: the bound, from the LM-head rows of every token, is the KL itself
    bound = kl.lower_bound(normed_states(dense, tokens), tokens, ALL_ROWS)
    torch.testing.assert_close(bound(normed_states(candidate, tokens)), expected, atol=1e-5, rtol=1e-5)


def test_top_k_kl_is_below_the_full_kl_within_the_stated_bound(dense, candidate, tokens):
    k = 4
    coarse = objective(dense, tokens, top_k=k).per_sequence(
        normed_states(candidate, tokens), tokens, ALL_ROWS
    )
    log_p, log_q = full_log_probs(dense, tokens), full_log_probs(candidate, tokens)
    full = (log_p.exp() * (log_p - log_q)).sum(dim=-1)

    top = log_p.topk(k, dim=-1)
    in_tail = torch.ones_like(log_p, dtype=torch.bool).scatter_(-1, top.indices, False)
    log_p_tail = log_p.masked_fill(~in_tail, -torch.inf).logsumexp(dim=-1, keepdim=True)
    log_q_tail = log_q.masked_fill(~in_tail, -torch.inf).logsumexp(dim=-1, keepdim=True)
    p_tail = log_p_tail.exp().squeeze(-1)
    assert p_tail.min() > 0.01  # a real tail, or the bound would be trivially 0

    # the identity: full - coarse = p_tail * KL(P~ || Q~) of the renormalised tails
    p_renorm, log_q_renorm = (log_p - log_p_tail).exp(), log_q - log_q_tail
    tail_kl = torch.where(in_tail, p_renorm * ((log_p - log_p_tail) - log_q_renorm), 0.0).sum(dim=-1)
    gap = full.mean(dim=1) - coarse
    torch.testing.assert_close(gap, (p_tail * tail_kl).mean(dim=1), atol=1e-5, rtol=1e-4)

    # the bound: p_tail * (min(0, log p_(k) - log p_tail) + max over the tail of -log Q~)
    smallest_kept = top.values[..., -1]
    entropy_term = (smallest_kept - log_p_tail.squeeze(-1)).clamp(max=0)
    worst_tail = (-log_q_renorm).masked_fill(~in_tail, -torch.inf).amax(dim=-1)
    bound = (p_tail * (entropy_term + worst_tail)).mean(dim=1)
    assert (gap > 1e-4).all()  # coarsening loses something here, so the comparisons below have teeth
    assert (coarse <= full.mean(dim=1) + 1e-6).all()
    assert (gap <= bound + 1e-6).all()


def test_the_bound_falls_short_of_the_top_k_kl_by_the_binary_kl_of_the_tail_masses(dense, candidate, tokens):
    kl = objective(dense, tokens, top_k=4, chunk_tokens=5)
    states = normed_states(candidate, tokens)
    coarse = kl.per_sequence(states, tokens, ALL_ROWS)
    bound = kl.lower_bound(normed_states(dense, tokens), tokens, ALL_ROWS)(states)

    log_q = full_log_probs(candidate, tokens).reshape(-1, VOCAB)
    in_tail = torch.ones_like(log_q, dtype=torch.bool).scatter_(
        1, kl.targets.top_ids.reshape(-1, 4).long(), False
    )
    q_tail = log_q.masked_fill(~in_tail, -torch.inf).logsumexp(dim=1).exp()
    p_tail = kl.targets.tail_logprob.reshape(-1).exp()
    assert p_tail.min() > 0.01 and (q_tail - p_tail).abs().max() > 0.01  # the tails differ: a real gap
    binary_kl = p_tail * (p_tail / q_tail).log() + (1 - p_tail) * ((1 - p_tail) / (1 - q_tail)).log()
    torch.testing.assert_close(
        coarse - bound, binary_kl.view(tokens.shape[0], -1).mean(dim=1), atol=2e-5, rtol=1e-4
    )
    assert (bound <= coarse + 1e-6).all()

    # the dense model's own states: both are 0
    own = kl.lower_bound(normed_states(dense, tokens), tokens, ALL_ROWS)(normed_states(dense, tokens))
    torch.testing.assert_close(own, torch.zeros_like(own), atol=1e-5, rtol=0)


def test_ignored_labels_are_left_out(dense, candidate, tokens):
    ignored = int(tokens[0, 3])
    tokens = tokens.clone()
    tokens[1, 5] = tokens[2, 1] = ignored  # every row but the last has an ignored label
    kl = objective(dense, tokens, top_k=VOCAB, ignore_index=ignored)
    got = kl.per_sequence(normed_states(candidate, tokens), tokens, ALL_ROWS)

    per_position = full_kl_per_position(dense, candidate, tokens)
    kept = tokens[:, 1:] != ignored
    assert not kept.all()
    expected = (per_position * kept).sum(dim=1) / kept.sum(dim=1)
    assert not torch.allclose(expected, per_position.mean(dim=1), atol=1e-4)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_chunking_changes_nothing(dense, candidate, tokens):
    adapter = adapter_for(dense)
    one_batch = DenseTargets.compute(dense, adapter, tokens, top_k=4, batch_size=4, chunk_tokens=1000)
    small = DenseTargets.compute(dense, adapter, tokens, top_k=4, batch_size=3, chunk_tokens=5)
    assert torch.equal(small.top_ids, one_batch.top_ids)
    torch.testing.assert_close(small.top_logprobs, one_batch.top_logprobs, atol=1e-6, rtol=0)
    torch.testing.assert_close(small.tail_logprob, one_batch.tail_logprob, atol=1e-6, rtol=1e-6)

    states = normed_states(candidate, tokens)
    whole = KlObjective(dense, adapter, LossSettings(chunk_tokens=1000), one_batch)
    chunked = KlObjective(dense, adapter, LossSettings(chunk_tokens=5), one_batch)
    torch.testing.assert_close(
        chunked.per_sequence(states, tokens, ALL_ROWS),
        whole.per_sequence(states, tokens, ALL_ROWS),
        atol=1e-6,
        rtol=1e-6,
    )


def test_rows_pick_their_own_targets(dense, candidate, tokens):
    states = normed_states(candidate, tokens[2:4])
    from_four = objective(dense, tokens, top_k=4).per_sequence(states, tokens[2:4], slice(2, 4))
    from_two = objective(dense, tokens[2:4], top_k=4).per_sequence(states, tokens[2:4], slice(0, 2))
    torch.testing.assert_close(from_four, from_two, atol=1e-6, rtol=1e-6)
    wrong_rows = objective(dense, tokens, top_k=4).per_sequence(states, tokens[2:4], slice(0, 2))
    assert not torch.allclose(wrong_rows, from_two, atol=1e-3)
    with pytest.raises(ValueError, match="rows"):
        objective(dense, tokens, top_k=4).per_sequence(states, tokens[2:4], slice(3, 4))


def test_zero_probabilities_give_no_nan():
    dense_top = torch.tensor([[0.0, -torch.inf]])  # all the mass on one token, none on the other or the tail
    dense_tail = torch.tensor([-torch.inf])
    cand_top = torch.tensor([[-torch.inf, -0.1]])  # the candidate gives the dense token zero probability
    cand_tail = torch.tensor([-torch.inf])
    kl = coarse_kl(dense_top, dense_tail, cand_top, cand_tail)
    assert torch.isfinite(kl).all()
    assert kl.item() == pytest.approx(-LOG_PROB_FLOOR)  # 1 * (0 - floor); the 0 * log 0 terms count 0


@pytest.mark.parametrize("top_k", [None, 4])
def test_a_kl_search_chooses_what_brute_force_kl_chooses(tiny_llama, top_k):
    """The search with the KL objective: every scored candidate's step loss is exp(mean KL) computed by hand
    from full forwards of the candidate and the dense model, and the choice is the lowest. With a top-4,
    the bound (below that KL) rules candidates out of racing without changing any choice."""

    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=True)
    tokens = _calibration(tiny_llama.config.vocab_size, n=4)
    loss = LossSettings(batch_size=2)
    vocab = tiny_llama.config.vocab_size
    targets = DenseTargets.compute(
        tiny_llama, prunable.adapter, tokens, top_k=top_k or vocab, batch_size=2, chunk_tokens=1024
    )
    objective = KlObjective(tiny_llama, prunable.adapter, loss, targets)
    scorers = {k: CalibrationScorer(prunable, tokens, loss, objective=objective) for k in ("block", "width")}
    with torch.no_grad():
        dense = F.log_softmax(tiny_llama(tokens).logits[:, :-1].float(), dim=-1)
    records = []
    settings = _settings(prunable, objective="kl", target_ratio=20.0, search="exact")
    plan = run_search(prunable, scorers, settings, on_step=lambda rec, p: records.append(rec), progress=False)
    assert records and plan.ratio(prunable.layout) > 0

    base = initial_plan(prunable.layout, settings.resolved(prunable.layout))
    bounded = 0
    for rec in records:
        brute = []
        for cand in rec.candidates:
            with prunable.trial(Candidate.from_dict(cand).apply(base)), torch.no_grad():
                q = F.log_softmax(tiny_llama(tokens).logits[:, :-1].float(), dim=-1)
            if top_k is None:
                per_sequence = (dense.exp() * (dense - q)).sum(-1).mean(-1)
            else:  # the top-4 KL, from the candidate's full log-probabilities
                ids = targets.top_ids.long()
                cand_tail = q.scatter(-1, ids, -torch.inf).logsumexp(-1)
                per_position = coarse_kl(
                    targets.top_logprobs.reshape(-1, top_k),
                    targets.tail_logprob.reshape(-1),
                    q.gather(-1, ids).reshape(-1, top_k),
                    cand_tail.reshape(-1),
                )
                per_sequence = per_position.view(tokens.shape[0], -1).mean(-1)
            brute.append(math.exp(per_sequence.mean().item()))
        scored = [k for k, c in enumerate(rec.candidates) if c["ppl"] is not None]
        assert [rec.candidates[k]["ppl"] for k in scored] == pytest.approx(
            [brute[k] for k in scored], rel=1e-4
        )
        bounded += rec.bounded_batches
        best = min(range(len(brute)), key=lambda k: (brute[k], k))
        assert Candidate.from_dict(rec.candidates[best]) == Candidate.from_dict(rec.choice)
        base = Candidate.from_dict(rec.choice).apply(base)
    if top_k is not None:
        assert bounded > 0  # the bound spared some candidates their LM head
