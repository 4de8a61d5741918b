"""The MultiPruner search: one greedy loop over three stages (blocks, MLP channel groups, attention units).

Each step scores every candidate of the current stage on the stage's calibration set and keeps the one
with the lowest perplexity (the first one on ties, candidates in the reference's order: attention
blocks by layer, then MLP blocks by layer). A stage ends once the pruning ratio reaches its cumulative
target; the last step may overshoot and the next stage starts from the ratio reached.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from tqdm.auto import tqdm

from ..errors import UsageError, listing
from ..core.layout import ModelLayout
from ..core.plan import PruningPlan
from .racing import RACE_MODES, RaceSettings
from ..core.reorder import CHANNEL_IMPORTANCE, ChannelOrder
from .scoring import CalibrationScorer
from ..settings import setting
from ..core.surgery import PrunableModel

log = logging.getLogger(__name__)


RATIO_ACCOUNTING = ("exact", "reference")


class SearchDivergedError(UsageError):
    """A step cannot choose: every candidate scored an infinite or NaN perplexity."""


class SearchConfigError(UsageError):
    """Search settings that cannot work for this model."""


@dataclass(frozen=True)
class Candidate:
    kind: str  # "attention" | "mlp" | "layer" (both blocks of one layer, --whole-layers)
    op: str  # "remove" | "shrink"
    layer: int
    width: int | None = None

    def apply(self, plan: PruningPlan) -> PruningPlan:
        if self.kind == "layer":
            return plan.without_block("attention", self.layer).without_block("mlp", self.layer)
        if self.op == "remove":
            return plan.without_block(self.kind, self.layer)
        return plan.with_width(self.kind, self.layer, self.width)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "op": self.op, "layer": self.layer, "width": self.width}

    @classmethod
    def from_dict(cls, data: dict) -> Candidate:
        return cls(data["kind"], data["op"], int(data["layer"]), data.get("width"))


def parse_distribution(text: str) -> tuple[float, float, float]:
    """``a:b:c`` shares of the ratio for blocks, MLP channels and attention heads (e.g. ``44:52:4``)."""
    try:
        values = tuple(float(p) for p in text.split(":"))
    except ValueError:
        values = ()
    if len(values) != 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(
            f"pruning distribution must be three non-negative numbers a:b:c with a positive sum "
            f"(e.g. 44:52:4), got {text!r}"
        )
    return values


METHODS = ("multipruner", "blockpruner", "shortgpt")
DEFAULT_DISTRIBUTION = {"multipruner": (44.0, 52.0, 4.0), "blockpruner": (100.0, 0.0, 0.0)}


@dataclass(frozen=True)
class SearchSettings:
    method: str = setting(
        "multipruner",
        help="multipruner: blocks, then MLP channels, then attention heads (the paper); blockpruner: "
        "attention/MLP blocks only (distribution 100:0:0); shortgpt: whole layers with the lowest Block "
        "Influence, in one shot",
        choices=METHODS,
    )
    target_ratio: float = setting(
        10.0, help="target pruning ratio, percent of all parameters", aliases=("--target_ratio",)
    )
    distribution: tuple[float, float, float] | None = setting(
        None,
        help="share of the ratio for blocks:MLP channels:attention heads "
        "(default: 44:52:4 for multipruner, 100:0:0 for blockpruner; shortgpt takes none)",
        aliases=("--pruning_distribution",),
        parse=parse_distribution,
    )
    mlp_group_size: int | None = setting(
        None,
        help="MLP channels removed per width step (default: the divisor of the MLP width nearest width/12)",
        aliases=("--mlp_channel_group_size",),
    )
    attention_group_size: int | None = setting(
        None,
        help="query channels removed per attention step, whole KV groups (default: one KV group)",
        aliases=("--attn_channel_group_size", "--attn-group-size"),
    )
    weight_reorder: bool = setting(
        True, help="reorder channels by importance before the search", aliases=("--weight_reorder",)
    )
    channel_importance: str = setting(
        "activations",
        help="what orders the channels a width step drops: activations, each channel's contribution to "
        "its branch output on the calibration sets (not in the paper; the plan stores the permutation; "
        "held-out WikiText-2 perplexity 15 percent lower on SmolLM2 at 10 percent, docs/quality.md); "
        "l1, the weights' L1 norms (the paper's)",
        choices=CHANNEL_IMPORTANCE,
        until_recorded="l1",  # runs made before the setting ordered by L1: they resume that way
    )
    ratio_accounting: str = setting(
        "exact",
        help="exact: a removed block's norms leave with it (the saved model's real size); reference: they "
        "stay counted, as in the authors' code (reproduces where its stages stop)",
        choices=RATIO_ACCOUNTING,
    )
    whole_layers: bool = setting(
        False,
        help="the block stage also offers each whole layer (its attention and MLP blocks together) as one "
        "step, the move ShortGPT makes and single-block steps cannot reach (not in the paper)",
    )
    search: str = setting(
        "exact",
        help="exact: drop candidates that provably cannot win (same plan as scoring all); "
        "fast: also drop those a paired test shows worse; off: score every candidate on every batch",
        choices=RACE_MODES,
    )
    layer_major_mb: float = setting(
        0.0,
        help="layer-major scoring: candidates past their own layer go through each later layer in one call, "
        "up to this many MB of activations (0: one candidate at a time; the same scores either way; "
        "slower on CPU, meant for GPUs)",
        affects_result=False,
    )
    max_steps: int | None = setting(
        None,
        help="stop after this many search steps (resume later)",
        affects_result=False,
        aliases=("--max_steps",),
    )

    def __post_init__(self):
        if self.distribution is None and self.method in DEFAULT_DISTRIBUTION:
            object.__setattr__(self, "distribution", DEFAULT_DISTRIBUTION[self.method])
        elif self.distribution is not None:
            object.__setattr__(self, "distribution", tuple(float(d) for d in self.distribution))

    @property
    def orders_by_activations(self) -> bool:
        """Channels are ordered by data, so the order waits for the calibration sets."""
        return self.weight_reorder and self.channel_importance == "activations"

    @property
    def race(self) -> RaceSettings:
        return RaceSettings(mode=self.search)

    def resolved(self, layout: ModelLayout) -> SearchSettings:
        """These settings with the model-dependent defaults filled in, checked against ``layout``."""
        settings = replace(
            self,
            mlp_group_size=self.mlp_group_size or default_mlp_group_size(layout.mlp_width),
            attention_group_size=self.attention_group_size or layout.heads.unit_channels,
        )
        settings.validate(layout)
        return settings

    def stage_targets(self) -> tuple[float, float, float]:
        total = sum(self.distribution)
        a, b, _ = (d / total for d in self.distribution)
        t = self.target_ratio
        return (t * a, t * (a + b), t)

    def validate_ratio(self) -> None:
        """The checks that need no model: ratio, distribution, step limit, group sizes given."""
        problems = self._problems_without_model()
        if problems:
            raise SearchConfigError(listing("invalid search settings", problems))

    def _problems_without_model(self) -> list[str]:
        problems = []
        if not 0 < self.target_ratio < 100:
            problems.append(f"target ratio must be in (0, 100) percent, got {self.target_ratio}")
        if self.layer_major_mb < 0:
            problems.append(
                f"--layer-major-mb must be 0 (off) or a positive budget, got {self.layer_major_mb}"
            )
        if self.method not in METHODS:
            problems.append(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
            return problems
        if self.method == "shortgpt":
            if self.distribution is not None:
                problems.append("--method shortgpt removes whole layers in one shot: drop --distribution")
            return problems
        if self.method == "blockpruner" and self.distribution[1:] != (0.0, 0.0):
            problems.append(
                f"--method blockpruner removes blocks only (distribution 100:0:0), not "
                f"{':'.join(f'{d:g}' for d in self.distribution)}: drop --distribution, or use --method multipruner"
            )
        if (
            len(self.distribution) != 3
            or any(d < 0 for d in self.distribution)
            or sum(self.distribution) <= 0
        ):
            problems.append(
                f"distribution must be three non-negative numbers with a positive sum, got {self.distribution}"
            )
        for flag, size in (
            ("--mlp-group-size", self.mlp_group_size),
            ("--attention-group-size", self.attention_group_size),
        ):
            if size is not None and size <= 0:
                problems.append(f"{flag} must be positive, got {size}")
        if self.max_steps is not None and self.max_steps < 0:
            problems.append(f"--max-steps must be 0 or more, got {self.max_steps}")
        return problems

    def validate(self, layout: ModelLayout) -> None:
        problems = self._problems_without_model()
        # A group need not divide the width (the reference's published commands use such sizes): a width
        # shrinks by the group while something remains, e.g. 18944 by 1024 down to 512.
        for flag, g, full in (
            ("--mlp-group-size", self.mlp_group_size, layout.mlp_width),
            ("--attention-group-size", self.attention_group_size, layout.attention_width),
        ):
            if g is not None and g >= full:
                problems.append(f"{flag} {g} leaves nothing of the width {full}: choose a smaller group")
        unit = layout.heads.unit_channels
        g = self.attention_group_size or 0
        if g > 0 and g % unit:
            problems.append(
                f"attention channel group size {g} must be a multiple of {unit} "
                f"({layout.heads.q_heads_per_unit} query heads x head_dim {layout.head_dim}: whole KV groups)"
            )
        if problems:
            raise SearchConfigError(listing("invalid search settings", problems))


def default_mlp_group_size(width: int) -> int:
    """The divisor of ``width`` nearest to width/12 (the authors use ~1/11-1/14 of the MLP width)."""
    divisors = [d for d in range(1, width + 1) if width % d == 0]
    return min(divisors, key=lambda d: (abs(d - width / 12), -d))


# --- stages: candidate generators ------------------------------------------------------
def block_candidates(plan: PruningPlan, settings: SearchSettings) -> list[Candidate]:
    out = []
    kept_attention = plan.num_layers - len(plan.removed_attention)
    for kind in ("attention", "mlp"):
        for i in range(plan.num_layers):
            if i in plan.removed(kind) or (kind == "attention" and kept_attention <= 1):
                continue  # a model needs one attention block to stay a sequence model
            out.append(Candidate(kind, "remove", i))
    if settings.whole_layers and kept_attention > 1:
        either_removed = plan.removed_attention | plan.removed_mlp
        out.extend(Candidate("layer", "remove", i) for i in range(plan.num_layers) if i not in either_removed)
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
    plan: dict  # PruningPlan.to_dict()
    skipped_batches: int = 0  # candidate-batches that racing did not need to run
    total_batches: int = 0
    bounded_batches: int = 0  # candidate-batches run whose full LM head the head bound made unnecessary
    batches_by_process: list[int] | None = None  # candidate-batches each torchrun process scored

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
    """The plan a step record ended with (records of runs before format 2 hold the reference format)."""
    base = initial_plan(layout, settings, channel_order)
    data = record.plan
    if "format" in data:
        stored = PruningPlan.from_dict(data)
    else:
        stored = PruningPlan.from_reference(data, layout, weight_reorder=settings.weight_reorder)
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
) -> PruningPlan:
    """Run (or continue, from ``done_steps``) the greedy search; returns the final plan.

    ``on_step`` is called after every finished step (the run directory writes it durably there).
    """
    layout = prunable.layout
    settings = settings.resolved(layout)
    done_steps = done_steps or []
    order = prunable.channel_order
    plan = (
        plan_from_record(done_steps[-1], layout, settings, order)
        if done_steps
        else initial_plan(layout, settings, order)
    )
    prunable.apply(plan)
    step = len(done_steps)
    targets = settings.stage_targets()
    for stage, target in zip(STAGES, targets, strict=True):
        while plan.ratio(layout, settings.ratio_accounting) < target:
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
                    plans,
                    [c.layer for c in candidates],
                    keys=candidates,
                    on_batch=bar.update,
                    race=settings.race,
                )
            best = scores.best()
            if not math.isfinite(scores.ppl[best]):
                raise SearchDivergedError(
                    f"step {step} ({stage.name}): every candidate has a non-finite calibration perplexity "
                    f"(best {scores.ppl[best]}), so there is nothing to choose between. The model overflows "
                    "or has lost what it needs; try --dtype float32, a lower --target-ratio, or another "
                    "--distribution (the steps before this one are saved in the run directory)."
                )
            plan = plans[best]
            prunable.apply(plan)
            record = StepRecord(
                step=step,
                stage=stage.name,
                candidates=[
                    {**c.to_dict(), "ppl": ppl, "partial_ppl": partial, "sequences": n}
                    for c, ppl, partial, n in zip(
                        candidates, scores.ppl, scores.partial_ppl, scores.sequences, strict=True
                    )
                ],
                choice={**candidates[best].to_dict(), "ppl": scores.ppl[best]},
                ppl=scores.ppl[best],
                ratio=plan.ratio(layout),
                params=plan.num_params(layout),
                elapsed_s=time.perf_counter() - started,
                plan=replace(plan, channel_order=None).to_dict(),  # the order is the run's, not the step's
                skipped_batches=scores.skipped_batches,
                total_batches=scores.total_batches,
                bounded_batches=scores.bounded_batches,
                batches_by_process=scores.batches_by_process,
            )
            log.info(
                "step %d [%s] %s %s layer %d -> ppl %.3f, ratio %.2f%% (%.1fs, racing skipped %d of %d "
                "candidate-batches, and the full LM head of %d more)",
                step,
                stage.name,
                candidates[best].op,
                candidates[best].kind,
                candidates[best].layer,
                scores.ppl[best],
                record.ratio,
                record.elapsed_s,
                scores.skipped_batches,
                scores.total_batches,
                scores.bounded_batches,
            )
            if on_step:
                on_step(record, plan)
            step += 1
    return plan
