"""What the search minimises: a loss per calibration sequence, from a candidate's final-normed hidden states.

Today that is the reference's loss: each sequence's mean next-token NLL, ignoring positions whose label is
the tokenizer's EOS id (the reference's ``ignore_index``), unless that id is 0 (see :func:`ignored_label`);
perplexity is exp of the mean over sequences. The LM head runs in chunks of tokens, so the [tokens x
vocab] logits tensor never exists whole (Gemma 3's vocabulary is 262k).

The scorer asks an objective for two things (:class:`NllObjective`): the exact loss of each sequence,
and optionally a cheap lower bound on it, which lets racing rule candidates out before paying their LM
head. Another objective (a KL divergence to the dense model's outputs, say) is one more class with the
same two methods.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapters import ArchitectureAdapter
from .head_bound import HeadBound

# a candidate's final-normed hidden states -> a lower bound on its loss per sequence
SequenceBound = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LossSettings:
    """How the scorer computes the loss, and how much memory its shortcuts may hold."""

    ignore_index: int | None = None
    chunk_tokens: int = 1024
    batch_size: int = 2
    # hidden states kept between steps: the candidates' (reuse.py) and, apart, the batches' recordings
    # (recordings.py), each within this (0 disables both)
    reuse_budget_mb: float = 2048.0
    # layer-major scoring: candidates whose tails reach a layer with the same modules pass it in one call,
    # up to this much activation memory per call (0: one candidate at a time)
    layer_major_budget_mb: float = 0.0
    # racing: rule candidates out with a lower bound on their loss from the labels and the current model's
    # top-k tokens per position (head_bound.py) before paying their full LM head; 0 disables it
    head_bound_top_k: int = 16
    # final hidden states kept per step until the candidates that may win get their exact loss
    head_bound_budget_mb: float = 2048.0


def ignored_label(tokenizer) -> int | None:
    """The label left out of the loss, as the reference picks it: the EOS id, but none when that id is 0
    (its ``if pad_token_id:`` test treats 0 as "no id")."""
    return getattr(tokenizer, "eos_token_id", None) or None


def sequence_nll(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    normed_hidden: torch.Tensor,
    input_ids: torch.Tensor,
    settings: LossSettings,
) -> torch.Tensor:
    """Mean next-token NLL of each sequence, from final-normed hidden states, chunk by chunk."""
    hidden = normed_hidden[:, :-1].reshape(-1, normed_hidden.shape[-1])
    labels = input_ids[:, 1:].reshape(-1).to(hidden.device)
    nll = torch.empty(labels.shape, dtype=torch.float32, device=hidden.device)
    for start in range(0, labels.numel(), settings.chunk_tokens):
        stop = start + settings.chunk_tokens
        logits = adapter.logits_from_hidden(model, hidden[start:stop]).float()
        nll[start:stop] = F.cross_entropy(logits, labels[start:stop], reduction="none")
    return per_sequence_mean(nll, input_ids, settings)


def per_sequence_mean(
    token_nll: torch.Tensor, input_ids: torch.Tensor, settings: LossSettings
) -> torch.Tensor:
    """Each sequence's mean over its positions (flattened in ``token_nll``), leaving out ignored labels."""
    nll = token_nll.view(input_ids.shape[0], -1)
    if settings.ignore_index is None:
        return nll.mean(dim=1)
    mask = input_ids[:, 1:].to(nll.device) != settings.ignore_index
    return (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


# --objective: a loss for every step, or KL on block steps and NLL on width steps (kl-block: there each
# ranks with less held-out regret, docs/quality.md §6)
OBJECTIVES = ("nll", "kl", "kl-block")
# what a step's score is called, per loss (a step's "ppl" is exp of its mean loss per sequence)
SCORE_NAMES = {"nll": "calibration perplexity", "kl": "calibration exp(KL to the dense model)"}


def set_objective(objective: str, calibration: str) -> str:
    """The loss (nll or kl) that ``--objective`` scores the steps on calibration set ``calibration`` by."""
    if objective == "kl-block":
        return "kl" if calibration == "block" else "nll"
    return objective


def perplexity_from_nll(per_sequence: torch.Tensor) -> float:
    return math.exp(per_sequence.mean().item())


class Objective(Protocol):
    """A loss per calibration sequence that the scorer minimises (lower is better)."""

    def per_sequence(self, normed_hidden: torch.Tensor, input_ids: torch.Tensor, rows: slice) -> torch.Tensor:
        """The loss of each sequence of the batch ``input_ids`` (rows ``rows`` of the calibration set),
        from a candidate's final-normed states."""
        ...

    def lower_bound(
        self, current: torch.Tensor, input_ids: torch.Tensor, rows: slice
    ) -> SequenceBound | None:
        """A cheap lower bound on any candidate's :meth:`per_sequence` on this batch, from the current
        model's final-normed states; None if there is none (then every candidate pays the exact loss)."""
        ...


@dataclass(frozen=True)
class NllObjective:
    """Each sequence's mean next-token NLL (the reference's loss), bounded below by the head bound."""

    model: nn.Module
    adapter: ArchitectureAdapter
    settings: LossSettings

    def per_sequence(self, normed_hidden: torch.Tensor, input_ids: torch.Tensor, rows: slice) -> torch.Tensor:
        return sequence_nll(self.model, self.adapter, normed_hidden, input_ids, self.settings)

    def lower_bound(
        self, current: torch.Tensor, input_ids: torch.Tensor, rows: slice
    ) -> SequenceBound | None:
        """The head bound (head_bound.py) on each sequence's mean; None for soft-capped logits."""
        settings = self.settings
        bound = HeadBound.from_current(
            self.model, self.adapter, current, input_ids, settings.head_bound_top_k, settings.chunk_tokens
        )
        if bound is None:
            return None
        return lambda normed: per_sequence_mean(bound.token_nll(normed), input_ids, settings)


@torch.inference_mode()
def full_forward_perplexity(model: nn.Module, tokens: torch.Tensor, settings: LossSettings) -> float:
    """The reference's way: full logits from ``model(ids)``, shifted cross entropy, per-sequence means.

    Used as the brute-force baseline in tests and benchmarks.
    """
    return perplexity_from_nll(full_forward_nll(model, tokens, settings))


def full_forward_nll(model: nn.Module, tokens: torch.Tensor, settings: LossSettings) -> torch.Tensor:
    """Each sequence's mean NLL, the reference's way (``full_forward_perplexity``)."""
    nlls = []
    device = next(model.parameters()).device  # batches go where the weights are, as the scorer's do
    for start in range(0, tokens.shape[0], settings.batch_size):
        ids = tokens[start : start + settings.batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1, :]
        labels = ids[:, 1:]
        ignore = settings.ignore_index if settings.ignore_index is not None else -100
        nll = F.cross_entropy(logits.permute(0, 2, 1).float(), labels, reduction="none", ignore_index=ignore)
        mask = labels != ignore
        nlls.append((nll * mask).sum(dim=1) / mask.sum(dim=1))
    return torch.cat(nlls)
