"""What a candidate plan costs, as the search's budget measures it.

The search removes until a plan's ``reduction`` (the percent of the dense model's cost it removes)
reaches each stage's target. Today the cost is the parameter count; a cost in weight bytes, FLOPs or
measured latency is one more class here with the same ``reduction`` method, chosen where the search
builds its cost (``run_search``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..core.layout import ModelLayout
from ..core.plan import PruningPlan


class Cost(Protocol):
    def reduction(self, plan: PruningPlan) -> float:
        """Percent of the dense model's cost that ``plan`` removes."""
        ...


@dataclass(frozen=True)
class ParamsCost:
    """Parameters, counted exactly (``accounting="exact"``: a removed block's norms leave with it) or as
    the authors' code counts them (``"reference"``: they stay counted)."""

    layout: ModelLayout
    accounting: str = "exact"

    def reduction(self, plan: PruningPlan) -> float:
        return plan.ratio(self.layout, self.accounting)
