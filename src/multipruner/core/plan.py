"""PruningPlan: what is removed from a model. Immutable, JSON-serialisable, countable without a model.

Our file format carries the model's layout (so a plan can be checked against a model before any heavy
work), the reorder flag and the group sizes; the reference's ``pruning_config.json`` can be read and
written too, so the authors' published plans apply unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import UsageError, listing
from ..io_utils import atomic_write_text
from .importance import ChannelOrder, ChannelOrderError
from .layout import ModelLayout

PLAN_FORMAT = "multipruner-plan/1"
BLOCK_KINDS = ("attention", "mlp")


class PlanError(UsageError):
    """A plan that does not fit the model, or a plan file that cannot be read."""


@dataclass(frozen=True)
class PruningPlan:
    """Removed residual blocks and kept widths per layer.

    ``attention_width[i]`` counts query channels (kept query heads x head_dim); key/value widths follow
    from the head layout. Widths of removed blocks are kept as they were and ignored.
    """

    removed_attention: frozenset[int]
    removed_mlp: frozenset[int]
    attention_width: tuple[int, ...]
    mlp_width: tuple[int, ...]
    weight_reorder: bool = True
    mlp_group_size: int | None = None
    attention_group_size: int | None = None
    # the permutation to replay when the channels were ordered by data (None: by weights, or not at all)
    channel_order: ChannelOrder | None = field(default=None, compare=False)
    meta: dict = field(default_factory=dict, compare=False)

    # --- construction -------------------------------------------------------------
    @classmethod
    def dense(cls, layout: ModelLayout, **kwargs) -> PruningPlan:
        n = layout.num_layers
        return cls(
            removed_attention=frozenset(),
            removed_mlp=frozenset(),
            attention_width=(layout.attention_width,) * n,
            mlp_width=(layout.mlp_width,) * n,
            **kwargs,
        )

    @property
    def num_layers(self) -> int:
        return len(self.mlp_width)

    def removed(self, kind: str) -> frozenset[int]:
        return {"attention": self.removed_attention, "mlp": self.removed_mlp}[kind]

    def width(self, kind: str) -> tuple[int, ...]:
        return {"attention": self.attention_width, "mlp": self.mlp_width}[kind]

    def without_block(self, kind: str, layer: int) -> PruningPlan:
        key = f"removed_{kind}"
        return replace(self, **{key: getattr(self, key) | {layer}})

    def with_width(self, kind: str, layer: int, width: int) -> PruningPlan:
        key = f"{kind}_width"
        widths = list(getattr(self, key))
        widths[layer] = width
        return replace(self, **{key: tuple(widths)})

    # --- counting -----------------------------------------------------------------
    def num_params(self, layout: ModelLayout, accounting: str = "exact") -> int:
        """Parameters of the pruned model. ``accounting="reference"`` counts as the authors' code does:
        a removed block's norms stay counted (they stay in its model), so it reaches a ratio a step later."""
        total = layout.non_layer_params
        for i in range(self.num_layers):
            if i not in self.removed_attention:
                total += layout.attention_params(self.attention_width[i])
            elif accounting == "reference":
                total += layout.branch_norm_params("attention")
            if i not in self.removed_mlp:
                total += layout.mlp_params(self.mlp_width[i])
            elif accounting == "reference":
                total += layout.branch_norm_params("mlp")
        return total

    def ratio(self, layout: ModelLayout, accounting: str = "exact") -> float:
        """Pruning ratio in percent of all parameters (a tied head counts once)."""
        return 100.0 * (1.0 - self.num_params(layout, accounting) / layout.dense_params())

    # --- validation ---------------------------------------------------------------
    # A plan checks itself when it is built (what needs no model), and against a model wherever it meets
    # one: ``load_plan``, ``check_plan_file`` (the layout the file stores) and ``PrunableModel.apply``, so
    # every trial and every extraction. No caller checks a plan by hand.
    def __post_init__(self):
        for name in ("removed_attention", "removed_mlp"):
            object.__setattr__(self, name, frozenset(getattr(self, name)))
        for name in ("attention_width", "mlp_width"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = self._problems()
        if problems:
            raise PlanError(listing("invalid pruning plan", problems))

    def _problems(self) -> list[str]:
        """What is wrong with the plan whatever the model: types, lengths, indices, signs."""
        fields = {
            "removed_attention": self.removed_attention,
            "removed_mlp": self.removed_mlp,
            "attention_width": self.attention_width,
            "mlp_width": self.mlp_width,
            "mlp_group_size": () if self.mlp_group_size is None else (self.mlp_group_size,),
            "attention_group_size": () if self.attention_group_size is None else (self.attention_group_size,),
        }
        not_whole = [name for name, values in fields.items() if not all(_is_whole(v) for v in values)]
        if not_whole:
            return [f"{', '.join(not_whole)} must hold whole numbers"]
        problems: list[str] = []
        n = len(self.mlp_width)
        if len(self.attention_width) != n:
            problems.append(
                f"plan has {n} MLP but {len(self.attention_width)} attention widths: one per layer"
            )
        for kind in BLOCK_KINDS:
            bad = sorted(i for i in self.removed(kind) if not 0 <= i < n)
            if bad:
                problems.append(f"removed {kind} block index out of range [0, {n}): {bad}")
        for name, widths, removed in (
            ("attention", self.attention_width, self.removed_attention),
            ("MLP", self.mlp_width, self.removed_mlp),
        ):
            problems += [
                f"layer {i}: {name} width {w} is not positive"
                for i, w in enumerate(widths)
                if w <= 0 and i not in removed
            ]
        for name, size in (("MLP", self.mlp_group_size), ("attention", self.attention_group_size)):
            if size is not None and size <= 0:
                problems.append(f"{name} group size {size} is not positive")
        if n and len(self.removed_attention) >= n:
            problems.append("plan removes every attention block; at least one must remain")
        return problems

    def check_fits(self, layout: ModelLayout) -> None:
        """Raise PlanError naming every way this plan does not fit ``layout``."""
        problems: list[str] = []
        n = layout.num_layers
        if len(self.mlp_width) != n or len(self.attention_width) != n:
            problems.append(
                f"plan has {len(self.mlp_width)} MLP / {len(self.attention_width)} attention widths, model has {n} layers"
            )
        # removed indices were checked against the plan's own layer count when it was built
        unit = layout.heads.unit_channels
        attn_step = self.attention_group_size or unit
        if problem := layout.heads.attention_group_problem(self.attention_group_size):
            problems.append(problem)
        mlp_step = self.mlp_group_size or 1
        checks = (
            ("attention", self.attention_width, layout.attention_width, attn_step, self.removed_attention),
            ("MLP", self.mlp_width, layout.mlp_width, mlp_step, self.removed_mlp),
        )
        for name, widths, full, step, removed in checks:
            for i, w in enumerate(widths[:n]):
                if i in removed:
                    continue
                if not 0 < w <= full:
                    problems.append(f"layer {i}: {name} width {w} outside (0, {full}]")
                elif (full - w) % step or (name == "attention" and w % unit):
                    problems.append(
                        f"layer {i}: {name} width {w} is not the full width {full} minus whole groups of {step}"
                        + (
                            f" (attention widths must be whole KV groups of {unit} channels)"
                            if name == "attention"
                            else ""
                        )
                    )
        if self.channel_order is not None:
            try:
                self.channel_order.check(n, layout.mlp_width, layout.heads.num_units)
            except ChannelOrderError as err:
                problems.append(str(err))
        if problems:
            raise PlanError(listing("invalid pruning plan", problems))

    # --- our JSON format ----------------------------------------------------------
    def to_dict(self, layout: ModelLayout | None = None) -> dict:
        data = {
            "format": PLAN_FORMAT,
            "weight_reorder": self.weight_reorder,
            "removed_attention": sorted(self.removed_attention),
            "removed_mlp": sorted(self.removed_mlp),
            "attention_width": list(self.attention_width),
            "mlp_width": list(self.mlp_width),
            "mlp_group_size": self.mlp_group_size,
            "attention_group_size": self.attention_group_size,
        }
        if self.channel_order is not None:
            data["channel_order"] = self.channel_order.to_dict()
        if layout is not None:
            pruned = self.num_params(layout)
            data["layout"] = layout.to_dict()
            data["params"] = {"dense": layout.dense_params(), "pruned": pruned, "ratio": self.ratio(layout)}
        if self.meta:
            data["meta"] = self.meta
        return data

    @classmethod
    def from_dict(cls, data: dict, layout: ModelLayout | None = None) -> PruningPlan:
        """Read our format or the reference's ``pruning_config.json`` (detected by its keys)."""
        if "pruned_attn_idx" in data or "pruned_mlp_width" in data:
            if layout is None:
                raise PlanError("a reference-format plan needs the model's layout to fill in unlisted layers")
            return cls.from_reference(data, layout)
        if data.get("format") != PLAN_FORMAT:
            raise PlanError(
                f"not a multipruner plan (format {data.get('format')!r}, expected {PLAN_FORMAT!r})"
            )

        def parsed(key: str, parse, default=...):
            if key not in data and default is not ...:
                return default
            try:
                return parse(data[key])
            except KeyError:
                raise PlanError(f"malformed multipruner plan: the field {key!r} is missing") from None
            except (TypeError, ValueError):
                raise PlanError(
                    f"malformed multipruner plan: {key!r} is {data[key]!r}, which is not what the field holds"
                ) from None

        def integers(values):
            return [int(v) for v in values]

        try:
            order = ChannelOrder.from_dict(data["channel_order"]) if data.get("channel_order") else None
        except ChannelOrderError as err:
            raise PlanError(str(err)) from None
        return cls(
            removed_attention=frozenset(parsed("removed_attention", integers)),
            removed_mlp=frozenset(parsed("removed_mlp", integers)),
            attention_width=tuple(parsed("attention_width", integers)),
            mlp_width=tuple(parsed("mlp_width", integers)),
            weight_reorder=bool(data.get("weight_reorder", True)),
            mlp_group_size=parsed("mlp_group_size", _optional_int, None),
            attention_group_size=parsed("attention_group_size", _optional_int, None),
            channel_order=order,
            meta=data.get("meta", {}),
        )

    # --- the reference's format ---------------------------------------------------
    def to_reference(self) -> dict:
        return {
            "pruned_attn_idx": sorted(self.removed_attention),
            "pruned_mlp_idx": sorted(self.removed_mlp),
            "pruned_attn_width": {str(i): w for i, w in enumerate(self.attention_width)},
            "pruned_mlp_width": {str(i): w for i, w in enumerate(self.mlp_width)},
        }

    @classmethod
    def from_reference(cls, data: dict, layout: ModelLayout, weight_reorder: bool = True) -> PruningPlan:
        base = cls.dense(layout, weight_reorder=weight_reorder)
        fields = _reference_fields(data)
        attn, mlp = list(base.attention_width), list(base.mlp_width)
        for key, widths in (("pruned_attn_width", attn), ("pruned_mlp_width", mlp)):
            for i, w in fields[key].items():
                if not 0 <= i < layout.num_layers:
                    raise PlanError(f"{key}: layer index {i} out of range [0, {layout.num_layers})")
                widths[i] = w
        return replace(
            base,
            removed_attention=frozenset(fields["pruned_attn_idx"]),
            removed_mlp=frozenset(fields["pruned_mlp_idx"]),
            attention_width=tuple(attn),
            mlp_width=tuple(mlp),
        )

    # --- files --------------------------------------------------------------------
    def save(self, path: str | Path, layout: ModelLayout | None = None) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(layout), indent=2) + "\n")

    def save_reference(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_reference(), indent=4) + "\n")


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_int(value) -> int | None:
    return None if value is None else int(value)


def _reference_fields(data: dict) -> dict:
    """The reference format's four fields with integer indices and widths (absent ones empty)."""
    try:
        return {
            **{key: [int(i) for i in data.get(key, [])] for key in ("pruned_attn_idx", "pruned_mlp_idx")},
            **{
                key: {int(i): int(w) for i, w in data.get(key, {}).items()}
                for key in ("pruned_attn_width", "pruned_mlp_width")
            },
        }
    except (TypeError, ValueError, AttributeError) as err:
        raise PlanError(f"malformed reference pruning_config: {err!r}") from None


def check_plan_file(path: str | Path) -> dict:
    """Everything about a plan file that needs no model: JSON, format, types, and (for our format, which
    stores the layout it was made for) the widths and indices against that layout. Returns its data."""
    data = read_plan_file(path)
    if "pruned_attn_idx" in data or "pruned_mlp_width" in data:
        try:
            _reference_fields(data)
        except PlanError as err:
            raise PlanError(f"plan {path}: {err}") from None
        return data
    try:
        plan = PruningPlan.from_dict(data)
    except PlanError as err:
        raise PlanError(f"plan {path}: {err}") from err
    if "layout" in data:
        try:
            layout = ModelLayout.from_dict(data["layout"])
        except (KeyError, TypeError) as err:
            raise PlanError(f"plan {path}: malformed layout: {err!r}") from err
        try:
            plan.check_fits(layout)
        except PlanError as err:
            raise PlanError(f"plan {path}: {err}") from err
    return data


def read_plan_file(path: str | Path) -> dict:
    """Read a plan file's JSON with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"plan file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PlanError(f"plan file {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise PlanError(f"plan file {path} must hold a JSON object")
    return data


def load_plan(path: str | Path, layout: ModelLayout, weight_reorder: bool | None = None) -> PruningPlan:
    """Load a plan in our format or the reference's and validate it against ``layout``.

    ``weight_reorder`` overrides the plan's flag (the reference format has none; its published plans
    were all made with reordering on).
    """
    data = read_plan_file(path)
    plan = PruningPlan.from_dict(data, layout)
    stored = data.get("layout")
    if stored and (stored.get("num_layers"), stored.get("hidden_size")) != (
        layout.num_layers,
        layout.hidden_size,
    ):
        raise PlanError(
            f"plan {path} was made for a model with {stored.get('num_layers')} layers / hidden size "
            f"{stored.get('hidden_size')}, not this one ({layout.num_layers} / {layout.hidden_size})"
        )
    if weight_reorder is not None:
        plan = replace(plan, weight_reorder=weight_reorder)
    plan.check_fits(layout)
    return plan
