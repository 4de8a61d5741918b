"""The MultiPruner search: one greedy loop over three stages (blocks, MLP channel groups, attention units).

Each step scores every candidate of the current stage on the stage's calibration set and keeps the one
with the lowest perplexity (the first one on ties, candidates in the reference's order: attention
blocks by layer, then MLP blocks by layer). A stage ends once the pruning ratio reaches its cumulative
target; the last step may overshoot and the next stage starts from the ratio reached.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from tqdm.auto import tqdm

from .layout import ModelLayout
from .plan import PruningPlan
from .scoring import CalibrationScorer
from .surgery import PrunableModel

log = logging.getLogger(__name__)


class SearchConfigError(ValueError):
    """Search settings that cannot work for this model."""


@dataclass(frozen=True)
class Candidate:
    kind: str  # "attention" | "mlp"
    op: str  # "remove" | "shrink"
    layer: int
    width: int | None = None

    def apply(self, plan: PruningPlan) -> PruningPlan:
        if self.op == "remove":
            return plan.without_block(self.kind, self.layer)
        return plan.with_width(self.kind, self.layer, self.width)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "op": self.op, "layer": self.layer, "width": self.width}

    @classmethod
    def from_dict(cls, data: dict) -> Candidate:
        return cls(data["kind"], data["op"], int(data["layer"]), data.get("width"))


@dataclass(frozen=True)
class SearchSettings:
    target_ratio: float
    distribution: tuple[float, float, float]
    mlp_group_size: int
    attention_group_size: int
    weight_reorder: bool = True
    max_steps: int | None = None

    def stage_targets(self) -> tuple[float, float, float]:
        total = sum(self.distribution)
        a, b, _ = (d / total for d in self.distribution)
        t = self.target_ratio
        return (t * a, t * (a + b), t)

    def validate(self, layout: ModelLayout) -> None:
        problems = []
        if not 0 < self.target_ratio < 100:
            problems.append(f"target ratio must be in (0, 100) percent, got {self.target_ratio}")
        if (
            len(self.distribution) != 3
            or any(d < 0 for d in self.distribution)
            or sum(self.distribution) <= 0
        ):
            problems.append(
                f"distribution must be three non-negative numbers with a positive sum, got {self.distribution}"
            )
        g, full = self.mlp_group_size, layout.mlp_width
        if g <= 0 or full % g:
            problems.append(f"MLP channel group size {g} must be positive and divide the MLP width {full}")
        unit = layout.heads.unit_channels
        g, full = self.attention_group_size, layout.attention_width
        if g <= 0 or g % unit:
            problems.append(
                f"attention channel group size {g} must be a multiple of {unit} "
                f"({layout.heads.q_heads_per_unit} query heads x head_dim {layout.head_dim}: whole KV groups)"
            )
        elif full % g:
            problems.append(f"attention channel group size {g} must divide the attention width {full}")
        if problems:
            raise SearchConfigError("invalid search settings:\n  - " + "\n  - ".join(problems))


# --- stages: candidate generators ------------------------------------------------------
def block_candidates(plan: PruningPlan, settings: SearchSettings) -> list[Candidate]:
    out = []
    kept_attention = plan.num_layers - len(plan.removed_attention)
    for kind in ("attention", "mlp"):
        for i in range(plan.num_layers):
            if i in plan.removed(kind) or (kind == "attention" and kept_attention <= 1):
                continue  # a model needs one attention block to stay a sequence model
            out.append(Candidate(kind, "remove", i))
    return out


def width_candidates(kind: str) -> Callable[[PruningPlan, SearchSettings], list[Candidate]]:
    def generate(plan: PruningPlan, settings: SearchSettings) -> list[Candidate]:
        group = settings.mlp_group_size if kind == "mlp" else settings.attention_group_size
        return [
            Candidate(kind, "shrink", i, w - group)
            for i, w in enumerate(plan.width(kind))
            if i not in plan.removed(kind) and w - group > 0
        ]

    return generate


@dataclass(frozen=True)
class Stage:
    name: str
    calibration: str  # key of the calibration set: "block" or "width"
    candidates: Callable[[PruningPlan, SearchSettings], list[Candidate]]


STAGES = (
    Stage("block", "block", block_candidates),
    Stage("mlp_width", "width", width_candidates("mlp")),
    Stage("attn_width", "width", width_candidates("attention")),
)


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
    plan: dict  # reference format

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def initial_plan(layout: ModelLayout, settings: SearchSettings) -> PruningPlan:
    return PruningPlan.dense(
        layout,
        weight_reorder=settings.weight_reorder,
        mlp_group_size=settings.mlp_group_size,
        attention_group_size=settings.attention_group_size,
    )


def plan_from_record(record: dict, layout: ModelLayout, settings: SearchSettings) -> PruningPlan:
    base = initial_plan(layout, settings)
    ref = PruningPlan.from_reference(record["plan"], layout, weight_reorder=settings.weight_reorder)
    return replace(
        base,
        removed_attention=ref.removed_attention,
        removed_mlp=ref.removed_mlp,
        attention_width=ref.attention_width,
        mlp_width=ref.mlp_width,
    )


def run_search(
    prunable: PrunableModel,
    scorers: dict[str, CalibrationScorer],
    settings: SearchSettings,
    done_steps: list[dict] | None = None,
    on_step: Callable[[StepRecord, PruningPlan], None] | None = None,
    progress: bool = True,
) -> PruningPlan:
    """Run (or continue, from ``done_steps``) the greedy search; returns the final plan.

    ``on_step`` is called after every finished step (the run directory writes it durably there).
    """
    layout = prunable.layout
    settings.validate(layout)
    done_steps = done_steps or []
    plan = (
        plan_from_record(done_steps[-1], layout, settings) if done_steps else initial_plan(layout, settings)
    )
    prunable.apply(plan)
    step = len(done_steps)
    targets = settings.stage_targets()
    for stage, target in zip(STAGES, targets, strict=True):
        while plan.ratio(layout) < target:
            if settings.max_steps is not None and step >= settings.max_steps:
                log.info("stopping after --max-steps %d", settings.max_steps)
                return plan
            candidates = stage.candidates(plan, settings)
            if not candidates:
                log.warning(
                    "stage %s has no candidates left at ratio %.2f%% (target %.2f%%)",
                    stage.name,
                    plan.ratio(layout),
                    target,
                )
                break
            started = time.perf_counter()
            scorer = scorers[stage.calibration]
            plans = [c.apply(plan) for c in candidates]
            n_batches = -(-scorer.tokens.shape[0] // scorer.settings.batch_size)
            with tqdm(
                total=len(candidates) * n_batches,
                desc=f"{stage.name} step {step}",
                unit="cand·batch",
                disable=not progress,
                leave=False,
            ) as bar:
                scores = scorer.score(
                    plans, [c.layer for c in candidates], keys=candidates, on_batch=bar.update
                )
            best = min(range(len(scores)), key=lambda k: (scores[k], k))
            plan = plans[best]
            prunable.apply(plan)
            record = StepRecord(
                step=step,
                stage=stage.name,
                candidates=[{**c.to_dict(), "ppl": s} for c, s in zip(candidates, scores, strict=True)],
                choice={**candidates[best].to_dict(), "ppl": scores[best]},
                ppl=scores[best],
                ratio=plan.ratio(layout),
                params=plan.num_params(layout),
                elapsed_s=time.perf_counter() - started,
                plan=plan.to_reference(),
            )
            log.info(
                "step %d [%s] %s layer %d -> ppl %.3f, ratio %.2f%% (%.1fs)",
                step,
                stage.name,
                candidates[best].op,
                candidates[best].layer,
                scores[best],
                record.ratio,
                record.elapsed_s,
            )
            if on_step:
                on_step(record, plan)
            step += 1
    return plan
