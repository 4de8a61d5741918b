"""The search's stages as candidate generators: what one step may remove from the current plan."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..core.plan import PruningPlan
from .settings import SearchSettings


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


def every_candidate(plan: PruningPlan, settings: SearchSettings) -> list[Candidate]:
    return [c for stage in STAGES for c in stage.candidates(plan, settings)]


# --distribution auto: one stage whose steps weigh every dimension's candidates on the block set
AUTO_STAGE = Stage("auto", "block", every_candidate)
