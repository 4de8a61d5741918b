"""A lower bound on a candidate's next-token NLL that costs a few thousand LM-head rows instead of all of them.

Every candidate of a search step pays the LM head and the loss over the whole vocabulary, as much as 8
of SmolLM2's 30 decoder layers and more than all 18 of Gemma-3-270M's (262k tokens). But a step only needs
the exact loss of the candidates that may win. For a candidate's final-normed hidden state ``h`` at a
position with label ``y``, logits ``z_v = w_v·h + b_v``, and the current model's ``h0``, ``z0``:

    lse(z) = log( sum_{v in S} e^{z_v} + sum_{v not in S} e^{z_v} )

with ``S`` the labels and the current model's top-k tokens at every position of the chunk (a few
thousand). The first sum is computed exactly. The tail is bounded below by Jensen's inequality under the
current model's tail distribution ``q_v ∝ e^{z0_v}`` (v not in S):

    sum_{v not in S} e^{z_v} = T0 · E_q[e^{w_v·(h - h0)}] >= T0 · exp(mu·(h - h0)),   mu = E_q[w_v]

so ``lse(z) - z_y >= logaddexp(lse_S(z), log T0 + mu·(h - h0)) - z_y`` holds exactly, for any ``h``.
It is close where the candidate's output distribution is close to the current model's, which is where
candidates are hard to tell apart. Measured on SmolLM2-135M (first block step, an MLP-width step):
0.04-0.06 nats per token below the exact NLL on average, enough to rule out 56 of 60 and 28 of 29
candidates without their full LM head.

Logit soft-capping (Gemma 2) makes ``z`` non-linear in ``h``; those models get no bound.

Lazy LM heads, the strategy over a step's state (step_state.py) that uses the bound: while racing, or
while screening for a step's finalists, each candidate's tail runs and its loss is only bounded (its
final states kept, :func:`lazy_heads` decides whether they fit); the exact loss is paid
(:func:`pay_heads`) for the leader, and at the end only for the candidates whose bound does not already
lose to the best total found, or to the K-th best when a screen keeps K (:func:`settle`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapters import ArchitectureAdapter
from .step_state import StepState


@dataclass
class _Chunk:
    tokens: slice  # positions of the flattened batch this chunk covers
    weight: torch.Tensor  # [|S|, hidden] the LM-head rows of S
    bias: torch.Tensor | None  # [|S|]
    log_tail: torch.Tensor  # [n] log of the current model's tail mass, sum_{v not in S} e^{z0_v}
    tail_mean: torch.Tensor  # [n, hidden] mu: the tail distribution's mean LM-head row


@dataclass
class HeadBound:
    """Lower bounds on per-token NLL for candidates of one batch, built from the current model's states."""

    base_hidden: torch.Tensor  # [n, hidden] current model, final-normed, positions with a label
    label_weight: torch.Tensor  # [n, hidden] the LM-head row of each label
    label_bias: torch.Tensor | None  # [n]
    chunks: list[_Chunk]

    @classmethod
    @torch.inference_mode()
    def from_current(
        cls,
        model: nn.Module,
        adapter: ArchitectureAdapter,
        normed_hidden: torch.Tensor,
        input_ids: torch.Tensor,
        top_k: int,
        chunk_tokens: int,
    ) -> HeadBound | None:
        """The bound for candidates scored on ``input_ids``; None where the family's logits are not linear
        in the hidden state (soft-capping)."""
        if adapter.logit_softcap(model):
            return None
        head = adapter.lm_head(model)
        weight, bias = head.weight, head.bias
        hidden = normed_hidden[:, :-1].reshape(-1, normed_hidden.shape[-1]).float()
        labels = input_ids[:, 1:].reshape(-1).to(hidden.device)
        chunks = []
        for start in range(0, labels.numel(), chunk_tokens):
            span = slice(start, min(start + chunk_tokens, labels.numel()))
            logits = adapter.logits_from_hidden(model, hidden[span].to(weight.dtype)).float()
            rows = torch.unique(torch.cat([logits.topk(top_k, dim=1).indices.reshape(-1), labels[span]]))
            logits[:, rows] = -torch.inf
            log_tail = torch.logsumexp(logits, dim=1)  # -inf where S is the whole vocabulary
            tail_prob = torch.softmax(logits, dim=1).nan_to_num(0.0)
            tail_mean = (tail_prob.to(weight.dtype) @ weight).float()
            chunks.append(
                _Chunk(
                    tokens=span,
                    weight=weight[rows].float(),
                    bias=None if bias is None else bias[rows].float(),
                    log_tail=log_tail,
                    tail_mean=tail_mean,
                )
            )
        return cls(
            base_hidden=hidden,
            label_weight=weight[labels].float(),
            label_bias=None if bias is None else bias[labels].float(),
            chunks=chunks,
        )

    def token_nll(self, normed_hidden: torch.Tensor) -> torch.Tensor:
        """A lower bound on each position's next-token NLL for a candidate's final-normed hidden states."""
        hidden = normed_hidden[:, :-1].reshape(-1, normed_hidden.shape[-1]).float()
        label_logit = (hidden * self.label_weight).sum(dim=1)
        if self.label_bias is not None:
            label_logit = label_logit + self.label_bias
        bound = torch.empty_like(label_logit)
        for chunk in self.chunks:
            h = hidden[chunk.tokens]
            kept = torch.logsumexp(F.linear(h, chunk.weight, chunk.bias), dim=1)
            tail = chunk.log_tail + (chunk.tail_mean * (h - self.base_hidden[chunk.tokens])).sum(dim=1)
            bound[chunk.tokens] = torch.logaddexp(kept, tail)
        return bound - label_logit


# Building a batch's bound costs about two LM heads (the current model's logits, and the tail's mean
# row: 1.07 s against 0.47 s for one candidate's exact loss on SmolLM2-135M, 1,024 tokens), so it pays
# only where it may spare more heads than that: with fewer candidates on a batch, each pays its own.
BOUND_MIN_CANDIDATES = 4


def lazy_heads(
    selecting: bool, top_k: int, budget_mb: float, candidates: int, state_values: int, dtype_bytes: int
) -> bool:
    """Whether a step bounds candidates' losses first and pays the full LM head only for those that may
    be chosen: the step selects (racing, or a screen keeping its best), and the final states of
    ``candidates`` (``state_values`` numbers each) fit ``budget_mb``. Under torchrun every process must
    decide alike: ``candidates`` is the largest share."""
    if not selecting or top_k <= 0:
        return False
    return candidates * state_values * dtype_bytes / 2**20 <= budget_mb


def pay_heads(state: StepState, k: int, exact_loss: Callable[[int, torch.Tensor], torch.Tensor]) -> None:
    """Candidate k's exact loss on every batch of this process whose LM head was put off
    (``exact_loss(batch, final_states)``)."""
    for b, normed in sorted(state.final_states[k].items()):
        state.record_exact(k, b, exact_loss(b, normed))
    state.final_states[k].clear()


def settle(
    state: StepState, alive: set[int], finish: Callable[[int], None], top: int = 1, within: float = 0.0
) -> None:
    """Exact totals (``finish``) for every candidate in ``alive`` that may still be among the ``top`` best
    totals, or within ``within`` of the best, lowest bound first; the others keep their bound (it already
    exceeds the ``top``-th best total found, and the best plus ``within``)."""
    threshold = _threshold(state, alive, top, within)
    for k in sorted(alive, key=lambda k: (state.lower_rank(k), k)):
        if k not in state.pending:
            continue
        if threshold < math.inf and not state.may_win({k}, threshold):
            break
        finish(k)
        threshold = _threshold(state, alive, top, within)  # only a finished total can lower it


def _threshold(state: StepState, alive: set[int], top: int, within: float) -> float:
    """The rank (the total, without a ranking) a candidate must not exceed to be among the ``top`` best of
    ``alive`` or within ``within`` of the best (inf while fewer than ``top`` are known)."""
    totals = sorted(state.rank(k) for k in alive if k not in state.pending)
    if len(totals) < top:
        return math.inf
    return max(totals[top - 1], totals[0] + within)
