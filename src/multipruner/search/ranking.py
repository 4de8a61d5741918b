"""How a step orders its candidates when they save different amounts (``--distribution auto``): by the
loss each adds to the current plan's, per unit of the budget's measure it saves.

A candidate's key, ``(total - base) / saved``, grows with its total loss over the step's sequences, so
everything the scorer decides from partial sums stays exact under it: a partial sum that only grows
gives a key that only grows (racing), and a lower bound on the total gives one on the key (the head
bound). Without a ranking, candidates are ordered by their total loss, as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Ranking:
    base: float  # the current plan's total loss over the same sequences
    saved: tuple[float, ...]  # what each candidate saves of the measure (all positive)

    def __post_init__(self):
        if not all(s > 0 for s in self.saved):
            raise ValueError("internal: a ranked candidate must save something of the budget's measure")

    def key(self, k: int, total: float) -> float:
        """Candidate k's loss increase per unit saved, for a total loss of ``total``."""
        return (total - self.base) / self.saved[k]

    def total_at(self, k: int, key: float) -> float:
        """The total loss at which candidate k's key is ``key``."""
        return key * self.saved[k] + self.base

    def of(self, members: Sequence[int], base: float) -> Ranking:
        """The ranking of some candidates (a screen's finalists), over sequences whose base total is ``base``."""
        return Ranking(base, tuple(self.saved[k] for k in members))
