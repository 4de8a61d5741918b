"""The MultiPruner search: one greedy loop over three stages (blocks, MLP channel groups, attention units).

Each step scores every candidate of the current stage on the stage's calibration set and keeps the one
with the lowest perplexity (the first one on ties, candidates in the reference's order: attention
blocks by layer, then MLP blocks by layer). A stage ends once the budget's measure (cost.py; the
parameters by default) is reduced by its cumulative share of the target; the last step may overshoot
and the next stage starts from what was reached.

``--distribution auto`` has one stage instead: each step weighs the candidates of all three dimensions
on the block set and keeps the one that adds the least loss per unit of the measure it saves
(ranking.py), until the budget is met.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from tqdm.auto import tqdm

from ..core.importance import ChannelOrder
from ..core.layout import ModelLayout
from ..core.plan import PruningPlan
from ..core.surgery import PrunableModel
from ..errors import UsageError
from ..faults import crash_point
from .latency import LatencyTable
from .lazy_screen import StaleKeys, forward_screen
from .ranking import Ranking
from .scoring import CalibrationScorer, StepScores
from .screening import width_proxy_scores
from .settings import SearchSettings
from .stages import AUTO_STAGE, STAGES, Candidate, Stage

log = logging.getLogger(__name__)


class SearchDivergedError(UsageError):
    """A step cannot choose: every candidate scored an infinite or NaN perplexity."""


@dataclass(frozen=True)
class StepRecord:
    step: int
    stage: str
    candidates: list[dict]
    choice: dict
    ppl: float
    ratio: float
    params: int
    elapsed_s: float
    plan: dict  # PruningPlan.to_dict()
    skipped_batches: int = 0  # candidate-batches that racing did not need to run
    total_batches: int = 0
    bounded_batches: int = 0  # candidate-batches run whose full LM head the head bound made unnecessary
    batches_by_process: list[int] | None = None  # candidate-batches each torchrun process scored
    finalists: list[int] | None = None  # screen, then decide: the candidates scored on the decision set
    measure: str = "params"  # the budget's (cost.py)
    reduction: float | None = None  # percent of the measure's dense total removed after the step

    def to_dict(self) -> dict:
        return self.__dict__.copy()

    @classmethod
    def from_dict(cls, data: dict) -> StepRecord:
        fields = {f: data[f] for f in cls.__dataclass_fields__ if f in data}
        return cls(**{"skipped_batches": 0, "total_batches": 0, "bounded_batches": 0, **fields})


def initial_plan(
    layout: ModelLayout, settings: SearchSettings, channel_order: ChannelOrder | None = None
) -> PruningPlan:
    return PruningPlan.dense(
        layout,
        weight_reorder=settings.weight_reorder,
        mlp_group_size=settings.mlp_group_size,
        attention_group_size=settings.attention_group_size,
        channel_order=channel_order,
    )


def plan_from_record(
    record: StepRecord,
    layout: ModelLayout,
    settings: SearchSettings,
    channel_order: ChannelOrder | None = None,
) -> PruningPlan:
    """The plan a step record ended with, on the run's channel order (the records do not repeat it)."""
    base = initial_plan(layout, settings, channel_order)
    stored = PruningPlan.from_dict(record.plan)
    return replace(
        base,
        removed_attention=stored.removed_attention,
        removed_mlp=stored.removed_mlp,
        attention_width=stored.attention_width,
        mlp_width=stored.mlp_width,
    )


def run_search(
    prunable: PrunableModel,
    scorers: dict[str, CalibrationScorer],
    settings: SearchSettings,
    done_steps: list[StepRecord] | None = None,
    on_step: Callable[[StepRecord, PruningPlan], None] | None = None,
    progress: bool = True,
    latency: LatencyTable | None = None,
) -> PruningPlan:
    """Run (or continue, from ``done_steps``) the greedy search; returns the final plan.

    ``on_step`` is called after every finished step (the run directory writes it durably there).
    ``latency``: this device's timings, for a latency budget (latency.py).
    """
    layout = prunable.layout
    dtype_bytes = next(prunable.model.parameters()).element_size()
    settings = settings.resolved(layout, dtype_bytes)
    done_steps = done_steps or []
    order = prunable.channel_order
    plan = (
        plan_from_record(done_steps[-1], layout, settings, order)
        if done_steps
        else initial_plan(layout, settings, order)
    )
    prunable.apply(plan)
    step = len(done_steps)
    previous = done_steps[-1] if done_steps else None
    cost = settings.cost(layout, dtype_bytes, latency)
    targets = settings.stage_targets(settings.reachable_target(layout, dtype_bytes, latency))
    screens = ScreeningSets(scorers, settings)
    for stage, target in zip((AUTO_STAGE,) if settings.auto else STAGES, targets, strict=True):
        while cost.reduction(plan) < target:
            if settings.max_steps is not None and step >= settings.max_steps:
                log.info("stopping after --max-steps %d", settings.max_steps)
                return plan
            # a candidate that saves nothing of the measure (an MLP's, for the KV cache) cannot help reach it
            candidates, plans, saved = [], [], []
            for candidate in stage.candidates(plan, settings):
                candidate_plan = candidate.apply(plan)
                if (saving := cost.saved(plan, candidate_plan)) > 0:
                    candidates.append(candidate)
                    plans.append(candidate_plan)
                    saved.append(saving)
            if not candidates:
                log.warning(
                    "stage %s has no candidates left at %.2f%% less %s (target %.2f%%)",
                    stage.name,
                    cost.reduction(plan),
                    cost.measure,
                    target,
                )
                break
            started = time.perf_counter()
            outcome = score_step(
                prunable,
                scorers[stage.calibration],
                screens,
                stage,
                candidates,
                plans,
                settings,
                step,
                progress,
                saved if settings.auto else None,
                previous,
            )
            scores = outcome.scores
            best = outcome.best
            if not math.isfinite(outcome.ppl[best]):
                raise SearchDivergedError(
                    f"step {step} ({stage.name}): every candidate has a non-finite calibration perplexity "
                    f"(best {outcome.ppl[best]}), so there is nothing to choose between. The model overflows "
                    "or has lost what it needs; try --dtype float32, a lower --target-ratio, or another "
                    "--distribution (the steps before this one are saved in the run directory)."
                )
            plan = plans[best]
            prunable.apply(plan)
            record = StepRecord(
                step=step,
                stage=stage.name,
                candidates=outcome.candidate_records(candidates, saved),
                choice={**candidates[best].to_dict(), "ppl": outcome.ppl[best]},
                ppl=outcome.ppl[best],
                ratio=plan.ratio(layout),
                params=plan.num_params(layout),
                elapsed_s=time.perf_counter() - started,
                plan=replace(plan, channel_order=None).to_dict(),  # the order is the run's, not the step's
                skipped_batches=scores.skipped_batches,
                total_batches=scores.total_batches,
                bounded_batches=scores.bounded_batches,
                batches_by_process=scores.batches_by_process,
                finalists=outcome.finalists,
                measure=cost.measure,
                reduction=cost.reduction(plan),
            )
            log.info(
                "step %d [%s] %s %s layer %d -> ppl %.3f, ratio %.2f%%, %s %.2f%% less (%.1fs, racing "
                "skipped %d of %d candidate-batches, and the full LM head of %d more)",
                step,
                stage.name,
                candidates[best].op,
                candidates[best].kind,
                candidates[best].layer,
                outcome.ppl[best],
                record.ratio,
                cost.measure,
                record.reduction,
                record.elapsed_s,
                scores.skipped_batches,
                scores.total_batches,
                scores.bounded_batches,
            )
            if on_step:
                on_step(record, plan)
            previous = record
            step += 1
    return plan


def new_steps(
    prunable: PrunableModel,
    scorers: dict[str, CalibrationScorer],
    settings: SearchSettings,
    done_steps: list[StepRecord] | None = None,
) -> list[StepRecord]:
    """The steps a search (or its continuation after ``done_steps``) makes, quietly: for benchmarks."""
    records: list[StepRecord] = []
    run_search(prunable, scorers, settings, done_steps, lambda record, plan: records.append(record), False)
    return records


class ScreeningSets:
    """Each stage's screening rows (the first sequences of its calibration set) and their scorer, and one
    on the set's other rows, where a forward screen's finalists finish their decision-set scores."""

    def __init__(self, scorers: dict[str, CalibrationScorer], settings: SearchSettings):
        self.scorers, self.settings = scorers, settings
        self._made: dict[str, tuple[CalibrationScorer, CalibrationScorer] | None] = {}

    def get(self, calibration: str) -> CalibrationScorer | None:
        """The scorer on the screening rows of a set, or None when the stage has none."""
        made = self._parts(calibration)
        return made[0] if made else None

    def rest(self, calibration: str) -> CalibrationScorer:
        """The scorer on the decision set's rows after the screening rows."""
        return self._parts(calibration)[1]

    def _parts(self, calibration: str) -> tuple[CalibrationScorer, CalibrationScorer] | None:
        if calibration not in self._made:
            decision = self.scorers[calibration]
            rows = self.settings.screen_rows(calibration, *decision.tokens.shape)
            made = (decision.part(slice(0, rows)), decision.part(slice(rows, None))) if rows else None
            self._made[calibration] = made
        return self._made[calibration]


@dataclass(frozen=True)
class StepOutcome:
    """One step's scores: the decision set's (``scores``, in candidate order, or the finalists' order when
    screened), and per candidate its decision perplexity and screening loss."""

    scores: StepScores
    ppl: list[float | None]  # decision-set perplexity; None: not scored to the end there
    best: int
    screen_loss: list[float] | None = None
    screen_bounded: list[bool] | None = None  # screen_loss is a lower bound (the head was never paid)
    finalists: list[int] | None = None
    screen_key: list[float] | None = None  # what orders the screen, fresh or older (lazy_screen.py)
    screened_at: list[int] | None = None  # the step each screen_key is from

    def candidate_records(self, candidates: list[Candidate], saved: list[float]) -> list[dict]:
        """Each candidate's scores, and what it would save of the budget's measure (``saved``)."""
        position = {k: i for i, k in enumerate(self.finalists)} if self.finalists else None
        records = []
        for k, c in enumerate(candidates):
            i = position.get(k) if position is not None else k
            record = {**c.to_dict(), "ppl": self.ppl[k], "saved_cost": saved[k]}
            if i is not None:
                record |= {"partial_ppl": self.scores.partial_ppl[i], "sequences": self.scores.sequences[i]}
                if self.scores.rank is not None:
                    record["rank"] = self.scores.rank[i]
            if self.screen_loss is not None:
                record["screen_loss"] = self.screen_loss[k]
            if self.screen_key is not None:
                record |= {"screen_key": self.screen_key[k], "screened_at": self.screened_at[k]}
            if self.screen_bounded and self.screen_bounded[k]:
                record["screen_loss_is_bound"] = True
            records.append(record)
        return records


def score_step(
    prunable: PrunableModel,
    scorer: CalibrationScorer,
    screens: ScreeningSets,
    stage: Stage,
    candidates: list[Candidate],
    plans: list[PruningPlan],
    settings: SearchSettings,
    step: int,
    progress: bool,
    saved: list[float] | None = None,
    previous: StepRecord | None = None,
) -> StepOutcome:
    """Score one step's candidates: all of them on the stage's set, or screen them and decide among the
    finalists on it (screening.py). ``saved``: each candidate's saved cost, to rank them by the loss
    they add per unit saved (ranking.py; the current plan's losses take one forward); else by loss.
    ``previous``: the last step's record, whose screen keys a lazy screen starts from (lazy_screen.py)."""
    layers = [c.layer for c in candidates]
    first = screens.get(stage.calibration)
    proxy = stage.calibration == "width" and settings.width_screen == "proxy"
    screen_loss = screen_bounded = carried = screen_key = screened_at = None
    ranking = screen_ranking = None
    if saved is not None:
        base = scorer.sequence_losses().double()
        ranking = Ranking(base.sum().item(), tuple(saved))
        if first is not None:
            screen_ranking = ranking.of(range(len(saved)), base[: first.tokens.shape[0]].sum().item())
    if proxy or first is not None:
        if proxy:
            # measured on the screening rows when there are: one forward costs about two finalists' tails
            tokens = (first or scorer).tokens
            losses = width_proxy_scores(
                prunable, candidates, tokens, scorer.settings.batch_size, scorer.device
            )
            screen_loss = [t.double().mean().item() for t in losses]
            finalists = settings.finalist_rule.pick(losses, screen_ranking)
        else:
            stale = _stale_keys(previous, stage, settings, step)
            with _bar(first, 0, f"{stage.name} step {step} screen", progress) as bar:
                screen = forward_screen(first, candidates, plans, settings, screen_ranking, stale, step, bar)
            screen_loss, screen_bounded = screen.mean_loss, screen.bounded
            screen_key, screened_at = screen.keys, screen.screened_at
            finalists = screen.finalists
            # the finalists' screening losses are exact, and the decision set's first rows
            scorer = screens.rest(stage.calibration)
            carried = [screen.nll[k] for k in finalists]
        crash_point("screened")
    else:
        finalists = list(range(len(candidates)))
    with _bar(scorer, len(finalists), f"{stage.name} step {step}", progress) as bar:
        scores = scorer.score(
            [plans[k] for k in finalists],
            [layers[k] for k in finalists],
            keys=[candidates[k] for k in finalists],
            on_batch=bar.update,
            race=settings.race,
            carried=carried,
            ranking=None if ranking is None else ranking.of(finalists, ranking.base),
        )
    ppl: list[float | None] = [None] * len(candidates)
    for i, k in enumerate(finalists):
        ppl[k] = scores.ppl[i]
    return StepOutcome(
        scores=scores,
        ppl=ppl,
        best=finalists[scores.best()],
        screen_loss=screen_loss,
        screen_bounded=screen_bounded,
        finalists=finalists if screen_loss is not None else None,
        screen_key=screen_key,
        screened_at=screened_at,
    )


def _stale_keys(
    previous: StepRecord | None, stage: Stage, settings: SearchSettings, step: int
) -> StaleKeys | None:
    """The keys a lazy screen starts from: the last step's, when it screened the same stage's candidates
    and this is not a step that screens all (every --rescreen-th)."""
    every = settings.rescreen_size
    if not every or previous is None or previous.stage != stage.name or step % every == 0:
        return None
    return StaleKeys.from_record(previous.candidates, previous.choice)


def _bar(scorer: CalibrationScorer, n_candidates: int, desc: str, progress: bool) -> tqdm:
    n_batches = -(-scorer.tokens.shape[0] // scorer.settings.batch_size)
    return tqdm(
        total=n_candidates * n_batches, desc=desc, unit="cand·batch", disable=not progress, leave=False
    )
