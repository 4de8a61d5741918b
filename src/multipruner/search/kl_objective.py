"""A KL divergence to the dense model's next-token distributions, as a search objective.

Why: the NLL objective scores a candidate on one label per position, a single sample of what the dense
model predicts there. The KL from the dense model's distribution ``P`` to the candidate's ``Q`` scores
the whole distribution at every position, so it should tell candidate structures apart with less noise
per calibration token (the reason EvoPress and DarwinLM search with it; not measured here). It needs the dense model's outputs, computed once (:class:`DenseTargets`); keeping
``[positions x vocab]`` log-probabilities is out of the question (Gemma 3's vocabulary is 262k), so each
position keeps the dense top-k tokens ``T`` and the log of the remaining mass.

The objective is the KL of the *coarsened* distributions: the k tokens of ``T`` plus one tail bucket.
With ``p_t = P(tail)``, ``q_t = Q(tail)`` and ``P~``, ``Q~`` the distributions renormalised on the tail,

    full KL   = sum_{v in T} p_v log(p_v / q_v) + sum_{v not in T} p_v log(p_v / q_v)
    coarse KL = sum_{v in T} p_v log(p_v / q_v) + p_t log(p_t / q_t)
    full - coarse = p_t * KL(P~ || Q~)  >= 0

(write ``p_v = p_t P~_v``, ``q_v = q_t Q~_v`` in the tail sum), so the coarse KL never exceeds the full
KL (the log-sum inequality), and equals it when k covers the vocabulary. Bounding the gap: every tail
token has ``p_v <= p_(k)``, the smallest kept probability, so ``sum P~ log P~ <= min(0, log(p_(k) / p_t))``,
and ``-sum P~ log Q~ <= max_{v not in T} -log Q~_v``, hence per position

    0 <= full - coarse <= p_t * ( min(0, log p_(k) - log p_t) + max_{v not in T} -log Q~_v )

and the gap of a sequence's mean is at most the same (masked) mean of this bound. It vanishes with the
tail mass; it is not small where the candidate puts almost nothing on some tail token, which is the price
of not storing the dense tail.

A lower bound that needs only the LM-head rows of ``T`` (:meth:`KlObjective.lower_bound`). With ``S_T``,
``S`` the candidate's sums of ``e^{z_v}`` over ``T`` and over the other tokens, the coarse KL is
``c - sum_T p_v z_v + log(S_T + S) - p_t log S``; over ``S`` that is smallest at ``S = p_t S_T / (1 - p_t)``
(the candidate's tail mass equal to the dense one), where it is

    coarse KL >= (1 - p_t) * KL(P_T || Q_T),   P_T, Q_T: P and Q renormalised on T,

short of the coarse KL by exactly the binary KL between the two tail masses, which is second order
where they are close. It holds for any logits, soft-capped ones included. A screen pays the full LM head
only for the candidates whose bound may still make them finalists (head_bound.settle).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapters import ArchitectureAdapter
from .objective import LossSettings, SequenceBound, per_sequence_mean

# A candidate's log-probability is clamped here so the KL stays finite where it gives a dense top token
# (or the whole tail) exactly zero probability; far below what a working candidate gives a dense top token.
LOG_PROB_FLOOR = -1e4


def _top_and_tail(log_probs: torch.Tensor, top_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-probabilities at ``top_ids`` [n, k] and the log of the mass on all other tokens [n]
    (-inf when ``top_ids`` is the whole vocabulary). Overwrites ``log_probs`` to save a vocab-sized copy."""
    top = log_probs.gather(1, top_ids)
    # logsumexp over the non-top tokens, not log1p(-sum top): exact even when the tail is tiny
    tail = log_probs.scatter_(1, top_ids, -torch.inf).logsumexp(dim=1)
    return top, tail


@dataclass(frozen=True)
class DenseTargets:
    """The dense model's next-token distribution at positions 0..seqlen-2 of each calibration row,
    coarsened to its top-k tokens and the log of the rest of the mass."""

    top_logprobs: torch.Tensor  # float32 [n, seqlen-1, k], descending along k
    top_ids: torch.Tensor  # int32 [n, seqlen-1, k]
    tail_logprob: torch.Tensor  # float32 [n, seqlen-1]; -inf where k covers the vocabulary

    @classmethod
    @torch.inference_mode()
    def compute(
        cls,
        model: nn.Module,
        adapter: ArchitectureAdapter,
        tokens: torch.Tensor,
        *,
        top_k: int,
        batch_size: int,
        chunk_tokens: int,
        device: torch.device | str | None = None,
    ) -> DenseTargets:
        """Targets for ``tokens`` [n, seqlen] from the dense ``model``: its decoder runs ``batch_size``
        rows at a time where its weights are, its LM head ``chunk_tokens`` positions at a time (the
        [tokens x vocab] logits never exist whole). The targets are kept on ``device`` (default: the
        model's), e.g. the CPU where accelerator memory is short; scoring moves each chunk as it needs it.
        """
        if tokens.dim() != 2 or tokens.shape[1] < 2:
            raise ValueError(f"tokens must be [n_sequences, seqlen >= 2], got {tuple(tokens.shape)}")
        if top_k < 1 or batch_size < 1 or chunk_tokens < 1:
            raise ValueError("top_k, batch_size and chunk_tokens must be at least 1")
        model_device = next(model.parameters()).device
        device = model_device if device is None else torch.device(device)
        n, positions = tokens.shape[0], tokens.shape[1] - 1
        top_logprobs = top_ids = tail_logprob = None  # allocated once the first chunk gives the vocab
        for start in range(0, n, batch_size):
            ids = tokens[start : start + batch_size].to(model_device)
            normed = adapter.decoder(model)(input_ids=ids, use_cache=False).last_hidden_state
            hidden = normed[:, :-1].reshape(-1, normed.shape[-1])
            flat = slice(start * positions, start * positions + hidden.shape[0])
            for chunk in range(0, hidden.shape[0], chunk_tokens):
                log_probs = F.log_softmax(
                    adapter.logits_from_hidden(model, hidden[chunk : chunk + chunk_tokens]).float(), dim=1
                )
                if top_logprobs is None:
                    k = min(top_k, log_probs.shape[1])
                    top_logprobs = torch.empty(n * positions, k, dtype=torch.float32, device=device)
                    top_ids = torch.empty(n * positions, k, dtype=torch.int32, device=device)
                    tail_logprob = torch.empty(n * positions, dtype=torch.float32, device=device)
                ids_k = log_probs.topk(k, dim=1).indices
                top, tail = _top_and_tail(log_probs, ids_k)
                rows = slice(flat.start + chunk, flat.start + chunk + ids_k.shape[0])
                top_logprobs[rows] = top.to(device)
                top_ids[rows] = ids_k.to(device, torch.int32)
                tail_logprob[rows] = tail.to(device)
        return cls(
            top_logprobs=top_logprobs.view(n, positions, k),
            top_ids=top_ids.view(n, positions, k),
            tail_logprob=tail_logprob.view(n, positions),
        )

    @property
    def top_k(self) -> int:
        return self.top_ids.shape[-1]

    @property
    def nbytes(self) -> int:
        """Memory the targets hold, in bytes."""
        return sum(t.element_size() * t.numel() for t in (self.top_logprobs, self.top_ids, self.tail_logprob))


def coarse_kl(
    dense_top: torch.Tensor, dense_tail: torch.Tensor, cand_top: torch.Tensor, cand_tail: torch.Tensor
) -> torch.Tensor:
    """KL(P || Q) over the top tokens plus one tail bucket, per position, from log-probabilities
    ([n, k] top, [n] tail). Terms where P is 0 count 0; Q's log-probabilities are clamped finite."""
    log_p = torch.cat([dense_top, dense_tail[:, None]], dim=1)
    log_q = torch.cat([cand_top, cand_tail[:, None]], dim=1).clamp(min=LOG_PROB_FLOOR)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(dim=1)


@dataclass(frozen=True)
class KlObjective:
    """Each sequence's mean KL from the dense model's coarsened next-token distribution to the
    candidate's (module docstring), leaving out the positions whose label is ``settings.ignore_index``
    as the NLL does."""

    model: nn.Module
    adapter: ArchitectureAdapter
    settings: LossSettings
    targets: DenseTargets

    @torch.no_grad()  # not inference_mode: the scorer may add to the losses in place afterwards
    def per_sequence(self, normed_hidden: torch.Tensor, input_ids: torch.Tensor, rows: slice) -> torch.Tensor:
        """float32 [batch]: the loss of rows ``rows`` of the calibration set (``input_ids``), from the
        candidate's final-normed states, LM head chunk by chunk."""
        targets = self.targets
        top_logprobs, top_ids, tail_logprob = (
            targets.top_logprobs[rows],
            targets.top_ids[rows],
            targets.tail_logprob[rows],
        )
        expected = (input_ids.shape[0], input_ids.shape[1] - 1)
        if tuple(tail_logprob.shape) != expected or tuple(normed_hidden.shape[:2]) != tuple(input_ids.shape):
            raise ValueError(
                f"rows {rows} of the targets give {tuple(tail_logprob.shape)} positions, the batch "
                f"{tuple(input_ids.shape)} with states {tuple(normed_hidden.shape)} needs {expected}"
            )
        hidden = normed_hidden[:, :-1].reshape(-1, normed_hidden.shape[-1])
        k = targets.top_k
        top_logprobs, top_ids, tail_logprob = (
            top_logprobs.reshape(-1, k),
            top_ids.reshape(-1, k),
            tail_logprob.reshape(-1),
        )
        device = hidden.device
        kl = torch.empty(hidden.shape[0], dtype=torch.float32, device=device)
        for start in range(0, hidden.shape[0], self.settings.chunk_tokens):
            span = slice(start, start + self.settings.chunk_tokens)
            logits = self.adapter.logits_from_hidden(self.model, hidden[span]).float()
            cand_top, cand_tail = _top_and_tail(
                F.log_softmax(logits, dim=1), top_ids[span].to(device, torch.int64)
            )
            kl[span] = coarse_kl(
                top_logprobs[span].to(device), tail_logprob[span].to(device), cand_top, cand_tail
            )
        return per_sequence_mean(kl, input_ids, self.settings)

    def lower_bound(
        self, current: torch.Tensor, input_ids: torch.Tensor, rows: slice
    ) -> SequenceBound | None:
        """``(1 - p_t) KL(P_T || Q_T)`` per sequence (module docstring), from the LM-head rows of the dense
        top tokens of each chunk of positions only; ``current`` is not needed."""
        targets, k = self.targets, self.targets.top_k
        top_ids = targets.top_ids[rows].reshape(-1, k)
        top_logprobs = targets.top_logprobs[rows].reshape(-1, k)
        device = current.device
        chunks = []  # per chunk of positions: its top tokens, each position's indices into them, P_T
        for start in range(0, top_ids.shape[0], self.settings.chunk_tokens):
            span = slice(start, start + self.settings.chunk_tokens)
            tokens, where = torch.unique(top_ids[span].to(device, torch.int64), return_inverse=True)
            dense = top_logprobs[span].to(device)
            kept = dense.logsumexp(dim=1)  # log(1 - p_t): the mass on T
            chunks.append((span, tokens, where, dense - kept[:, None], kept.exp()))

        def bound(normed: torch.Tensor) -> torch.Tensor:
            hidden = normed[:, :-1].reshape(-1, normed.shape[-1])
            kl = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            for span, tokens, where, log_p, mass in chunks:
                logits = self.adapter.logits_for_tokens(self.model, hidden[span], tokens).float()
                log_q = F.log_softmax(logits.gather(1, where), dim=1)
                p_top = log_p.exp()
                kl[span] = mass * torch.where(p_top > 0, p_top * (log_p - log_q), 0.0).sum(dim=1)
            return per_sequence_mean(kl, input_ids, self.settings)

        return bound
