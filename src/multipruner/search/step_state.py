"""What one search step knows about its candidates so far: per-sequence losses by batch, or lower bounds.

The scorer's step loop (racing) reads it to decide who is scored next; the strategies that fill it
(head_bound: lazy LM heads, distributed: the torchrun exchange) write it through the ``record_*``
methods.
"""

from __future__ import annotations

import math

import torch

from .racing import exact_survivors
from .ranking import Ranking

# the batch key of the losses a step starts with: known exactly on sequences before the scorer's own (a
# screen's, on the rows it shares with the decision set); first in every sum, never run again
CARRIED = -1


class StepState:
    """Per-candidate losses of one step, by batch.

    ``lower[k][b]``: candidate k's per-sequence loss on batch b, or a lower bound on it while only its tail
    has run (``lazy``: the exact loss waits, with the final states in ``final_states``, until its LM head
    is paid; the candidate is then in ``pending``). ``nll[k][b]``: the exact loss, once known.
    """

    def __init__(
        self, n_candidates: int, lazy: bool, weight_dtype: torch.dtype, ranking: Ranking | None = None
    ):
        self.lazy = lazy
        self.ranking = ranking  # None: candidates are ordered by their total loss
        self.nll: list[dict[int, torch.Tensor]] = [{} for _ in range(n_candidates)]
        self.lower: list[dict[int, torch.Tensor]] = [{} for _ in range(n_candidates)]
        self.final_states: list[dict[int, torch.Tensor]] = [{} for _ in range(n_candidates)]
        self.pending: set[int] = set()  # candidates with a bounded batch (every process knows them)
        self.scored_here = 0  # candidate-batches this process ran
        # bounds are rounded like the losses they bound: compare them with room for that
        self.margin = 1e-5 if weight_dtype in (torch.float32, torch.float64) else 1e-3

    def __len__(self) -> int:
        return len(self.nll)

    def record_exact(self, k: int, b: int, nll: torch.Tensor) -> None:
        self.nll[k][b] = self.lower[k][b] = nll

    def carry(self, k: int, nll: torch.Tensor) -> None:
        """Candidate k's exact per-sequence losses on the sequences before this step's set."""
        self.record_exact(k, CARRIED, nll)

    def carried_sequences(self, k: int) -> int:
        return self.nll[k][CARRIED].numel() if CARRIED in self.nll[k] else 0

    def record_bound(self, k: int, b: int, lower: torch.Tensor, final_states: torch.Tensor) -> None:
        """A lower bound on candidate k's loss on batch b; its final states wait for the LM head."""
        self.lower[k][b] = lower
        self.final_states[k][b] = final_states
        self.pending.add(k)

    def sequence_nll(self, k: int) -> torch.Tensor:
        """Candidate k's exact per-sequence losses, in sequence order (empty while only bounded)."""
        return _in_batch_order(self.nll[k])

    def sequence_lower(self, k: int) -> torch.Tensor:
        """Candidate k's per-sequence losses, or lower bounds where its LM head is still put off."""
        return _in_batch_order(self.lower[k])

    def batches_run(self, k: int) -> int:
        return sum(1 for b in self.lower[k] if b != CARRIED)

    def exact_batches(self, k: int) -> int:
        """Batches run whose exact loss is known (their LM head paid)."""
        return sum(1 for b in self.nll[k] if b != CARRIED)

    def sequences_scored(self, k: int) -> int:
        return sum(t.numel() for t in self.lower[k].values())

    def exact_sequences(self, k: int) -> int:
        return sum(t.numel() for t in self.nll[k].values())

    def partial_sum(self, k: int) -> float:
        # float64, in batch order: the same sum whichever rule reads it, so comparisons are consistent
        return sum(self.nll[k][b].double().sum().item() for b in sorted(self.nll[k]))

    def lower_sum(self, k: int) -> float:
        """The loss so far, or a lower bound on it where a batch's LM head is still put off."""
        return sum(self.lower[k][b].double().sum().item() for b in sorted(self.lower[k]))

    def partial_ppl(self, k: int) -> float:
        n = self.sequences_scored(k)
        return math.exp(self.lower_sum(k) / n) if n else math.inf

    def rank(self, k: int) -> float:
        """Candidate k's place in the step's order (lower: better) from its exact loss so far."""
        return self._key(k, self.partial_sum(k))

    def lower_rank(self, k: int) -> float:
        """``rank`` from the loss so far or its lower bound: it never exceeds the final rank."""
        return self._key(k, self.lower_sum(k))

    def _key(self, k: int, total: float) -> float:
        return total if self.ranking is None else self.ranking.key(k, total)

    def may_win(self, candidates, bound: float) -> set[int]:
        """The candidates whose loss so far (or its lower bound) does not yet rank behind a finished
        candidate's final rank ``bound``."""
        if self.ranking is None:
            slack = self.margin * abs(bound) if self.lazy else 0.0
            return exact_survivors({k: self.lower_sum(k) for k in candidates}, bound + slack)
        survivors = set()
        for k in candidates:  # compared as totals, where the bounds' rounding is known
            total = self.ranking.total_at(k, bound)
            if self.lower_sum(k) <= total + (self.margin * abs(total) if self.lazy else 0.0):
                survivors.add(k)
        return survivors


def _in_batch_order(by_batch: dict[int, torch.Tensor]) -> torch.Tensor:
    """Per-sequence values of the batches held, in sequence order (empty if none)."""
    return torch.cat([by_batch[b] for b in sorted(by_batch)]) if by_batch else torch.empty(0)
