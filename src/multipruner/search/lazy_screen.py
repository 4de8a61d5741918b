"""Lazy screening (``--rescreen N``; not in the paper): a screened step re-screens only the candidates that
may be finalists, and keeps the others' keys from their last screen.

A step changes one layer of the plan, so most candidates' screen keys move little from one step to the
next: over the SmolLM2-135M auto search (31 steps of 120 candidates, docs/quality.md §7) every step's
finalists were in the previous step's best 10. So a step screens

- the N candidates whose last screen key was lowest,
- those at the layer the last step changed, and any the last step did not offer (a narrower width),

and, while the K-th best key screened now is above the lowest key left from an older screen, the next N
in that order too. That is the lazy greedy's rule: when no candidate's key falls between its screens, the
finalists are the ones a full screen would pick. Keys do fall a little (noise, and the base moves), so
every N-th step screens every candidate again.

A candidate's key is its screen's rank key (ranking.py) where candidates are ranked, else its total
loss over the screening rows; both compare across steps because the rows stay the same. The keys and the
step each was screened at are in the step records, so a resumed run screens as the uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .stages import Candidate

if TYPE_CHECKING:
    from tqdm import tqdm

    from ..core.plan import PruningPlan
    from .ranking import Ranking
    from .scoring import CalibrationScorer
    from .settings import SearchSettings


@dataclass(frozen=True)
class StaleKeys:
    """The previous step's screen keys (fresh or carried) and the layer that step changed."""

    # by candidate: a frozen Candidate compares by kind, op, layer and width, so a narrower width is
    # another candidate
    keys: dict[Candidate, float]
    screened_at: dict[Candidate, int]
    changed_layer: int

    @classmethod
    def from_record(cls, candidates: Sequence[dict], choice: dict) -> StaleKeys | None:
        """From a step record's candidates; None when that step recorded no screen keys."""
        if not candidates or any(c.get("screen_key") is None for c in candidates):
            return None
        offered = [Candidate.from_dict(c) for c in candidates]
        return cls(
            {c: float(r["screen_key"]) for c, r in zip(offered, candidates, strict=True)},
            {c: int(r["screened_at"]) for c, r in zip(offered, candidates, strict=True)},
            int(choice["layer"]),
        )

    def split(self, candidates: Sequence[Candidate], size: int) -> tuple[list[int], list[int]]:
        """``(screen now, the others in order of their old keys)``, as candidate indices."""
        must = [k for k, c in enumerate(candidates) if c not in self.keys or c.layer == self.changed_layer]
        known = set(must)
        others = sorted(
            (k for k in range(len(candidates)) if k not in known),
            key=lambda k: (self.keys[candidates[k]], k),
        )
        return sorted(must + others[:size]), others[size:]


def needs_more(fresh_keys: Sequence[float], finalists: int, lowest_stale: float) -> bool:
    """Whether a candidate not screened this step (``lowest_stale``: the lowest key left) could still
    displace one of the ``finalists`` best keys screened so far."""
    best = sorted(math.inf if math.isnan(k) else k for k in fresh_keys)
    return len(best) < finalists or lowest_stale < best[finalists - 1]


@dataclass(frozen=True)
class Screen:
    """A forward screen's outcome, per candidate (None where a lazy screen did not screen it now)."""

    mean_loss: list[float | None]  # mean loss per token (a lower bound where ``bounded``)
    bounded: list[bool | None]  # the screen never paid this candidate's LM head
    nll: list[torch.Tensor | None]  # loss per screening sequence, exact for the finalists
    keys: list[float]  # what orders the screen, from this step or the step in ``screened_at``
    screened_at: list[int]
    finalists: list[int]


def forward_screen(
    scorer: CalibrationScorer,
    candidates: Sequence[Candidate],
    plans: Sequence[PruningPlan],
    settings: SearchSettings,
    ranking: Ranking | None,
    stale: StaleKeys | None,
    step: int,
    bar: tqdm,
) -> Screen:
    """Screen a step's candidates on ``scorer``'s rows (all, or lazily from ``stale``) and pick the
    finalists among those screened now; ``ranking``: over all the candidates, as in the step."""
    n = len(candidates)
    rule = settings.finalist_rule
    mean_loss: list[float | None] = [None] * n
    bounded: list[bool | None] = [None] * n
    nll: list[torch.Tensor | None] = [None] * n
    lower: dict[int, torch.Tensor] = {}
    keys = [stale.keys.get(c, math.nan) if stale else math.nan for c in candidates]
    screened_at = [stale.screened_at.get(c, step) if stale else step for c in candidates]
    now, later = stale.split(candidates, settings.rescreen_size) if stale else (list(range(n)), [])
    n_batches = -(-scorer.tokens.shape[0] // scorer.settings.batch_size)
    while True:
        bar.total = (bar.total or 0) + len(now) * n_batches
        bar.refresh()
        scores = scorer.score(
            [plans[k] for k in now],
            [candidates[k].layer for k in now],
            keys=[candidates[k] for k in now],
            on_batch=bar.update,
            finalists=rule,
            ranking=None if ranking is None else ranking.of(now, ranking.base),
        )
        for i, k in enumerate(now):
            # a candidate whose head the screen never paid has a lower bound here, which already ranks
            # it behind every finalist
            lower[k] = scores.sequence_lower[i]
            nll[k] = scores.sequence_nll[i]
            total = lower[k].double().sum().item()
            mean_loss[k] = lower[k].double().mean().item()
            bounded[k] = scores.ppl[i] is None
            keys[k] = total if ranking is None else ranking.key(k, total)
            screened_at[k] = step
        if not later or not needs_more([keys[k] for k in lower], rule.top_k, keys[later[0]]):
            break
        now, later = later[: settings.rescreen_size], later[settings.rescreen_size :]
    members = sorted(lower)
    picked = rule.pick(
        [lower[k] for k in members], None if ranking is None else ranking.of(members, ranking.base)
    )
    return Screen(mean_loss, bounded, nll, keys, screened_at, [members[i] for i in picked])
