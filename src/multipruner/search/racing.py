"""Early elimination of candidates within a search step ("racing"), as pure decisions over NLL sums.

A candidate's calibration loss is a sum over sequences of non-negative per-sequence mean NLLs, so the
partial sum over the sequences scored so far only grows. Two rules use that:

* ``exact``: once one candidate (the *leader*) is scored on every sequence, any candidate whose
  partial sum already exceeds the leader's total can never win, whatever its remaining sequences
  hold. Dropping it changes no choice: the plan is identical to scoring everything.
* ``fast``: a paired test over the sequences seen so far: the candidate's per-sequence NLL minus the
  current leader's. A candidate whose mean difference exceeds ``z`` standard errors is dropped. It is
  a statistical decision (it may, rarely, drop a candidate within noise of the best); every survivor
  is still scored on all sequences before the choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RACE_MODES = ("exact", "fast", "off")


@dataclass(frozen=True)
class RaceSettings:
    mode: str = "exact"  # exact | fast | off (score every candidate on every batch)
    z: float = 3.0  # fast: drop a candidate worse than the leader by more than z standard errors
    min_sequences: int = 4  # fast: sequences seen before the first test

    def __post_init__(self):
        if self.mode not in RACE_MODES:
            raise ValueError(f"unknown search mode {self.mode!r}; choose one of {', '.join(RACE_MODES)}")


def exact_survivors(partial_sums: dict[int, float], bound: float) -> set[int]:
    """Candidates that may still beat (or tie) a finished candidate whose total is ``bound``."""
    return {k for k, s in partial_sums.items() if s <= bound}


def paired_survivors(nll: dict[int, torch.Tensor], z: float) -> set[int]:
    """Candidates not shown worse than the leader by a paired test over the same sequences.

    ``nll[k]``: per-sequence NLLs of candidate ``k`` on the sequences seen so far (same order for all).
    """
    if len(nll) < 2:
        return set(nll)
    keys = sorted(nll)
    matrix = torch.stack([nll[k].double() for k in keys])
    leader = min(range(len(keys)), key=lambda i: (matrix[i].sum().item(), keys[i]))
    diff = matrix - matrix[leader]
    n = diff.shape[1]
    if n < 2:
        return set(keys)
    mean = diff.mean(dim=1)
    stderr = diff.std(dim=1) / math.sqrt(n)
    worse = mean - z * stderr > 0
    return {k for i, k in enumerate(keys) if i == leader or not bool(worse[i])}
