"""The configured search method, run (or continued) on one model: MultiPruner's greedy stages (BlockPruner
is the same loop with the width stages given no share) or ShortGPT's one-shot layer removal."""

from __future__ import annotations

from collections.abc import Callable

from ..core.plan import PruningPlan
from ..core.surgery import PrunableModel
from .latency import LatencyTable
from .loop import StepRecord, run_search
from .scoring import CalibrationScorer
from .settings import SearchSettings
from .shortgpt import run_shortgpt


def scores_in_one_shot(settings: SearchSettings) -> bool:
    """ShortGPT ranks every layer once, so there is no per-candidate scoring to share among processes."""
    return settings.method == "shortgpt"


def run_method(
    prunable: PrunableModel,
    scorers: dict[str, CalibrationScorer],
    settings: SearchSettings,
    *,
    done_steps: list[StepRecord],
    on_step: Callable[[StepRecord, PruningPlan], None] | None = None,
    progress: bool = True,
    latency: LatencyTable | None = None,
) -> PruningPlan:
    """The final plan of ``settings.method``, after ``done_steps`` (a resumed run's finished steps)."""
    if scores_in_one_shot(settings):
        block = scorers["block"]
        return run_shortgpt(
            prunable,
            block.perplexity,
            block.tokens,
            settings,
            batch_size=block.settings.batch_size,
            done_steps=len(done_steps),
            on_step=on_step,
            latency=latency,
        )
    return run_search(
        prunable,
        scorers,
        settings,
        done_steps=done_steps,
        on_step=on_step,
        progress=progress,
        latency=latency,
    )
