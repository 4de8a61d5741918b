"""What a plan costs under a budget's measure, and the budgets a search can be given.

Every measure is a sum over layers of what each kept branch costs at its width, plus what the layers do
not hold, so a candidate's saved cost is the difference of two plans' costs and the saved costs of a
search's steps add up to what the final plan saves:

* ``params``: parameters (``accounting="exact"``: a removed block's norms leave with it; ``"reference"``:
  they stay counted, as the authors' code counts them);
* ``weights-bytes``: the saved weights' bytes, at the model's dtype (a tied head counts once);
* ``flops``: matrix-multiply FLOPs (2 per multiply-add) of one decoded token at ``context`` tokens of
  context: projections, the attention over the context (or a layer's sliding window) and the LM head.
  Norms, activations and softmax are left out: they are what torch's FLOP counter leaves out too;
* ``kv-bytes``: the KV cache of one sequence after ``context`` tokens (a sliding-window layer keeps the
  window's last tokens but one, what the next token attends to besides itself);
* ``decode-latency`` / ``prefill-latency``: seconds on this device, from a short calibration of the
  model's own layers (latency.py).

A budget (``Budget``) names a measure and how much of it to remove: a percent, a factor (``2x``: half
the cost; for a latency, twice as fast) or the amount to end at (``5GB``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..core.layout import ModelLayout
from ..core.plan import PruningPlan
from .latency import LATENCY_MEASURES, LatencyTable

COUNTED_MEASURES = ("params", "weights-bytes", "flops", "kv-bytes")  # exactly, from the plan
MEASURES = (*COUNTED_MEASURES, *LATENCY_MEASURES)
_SHORT_NAMES = {
    "weights": "weights-bytes",
    "kv": "kv-bytes",
    "kv-cache": "kv-bytes",
    "parameters": "params",
    "decode": "decode-latency",
    "prefill": "prefill-latency",
}
UNITS = {
    "params": "parameters",
    "weights-bytes": "bytes",
    "flops": "FLOPs",
    "kv-bytes": "bytes",
    "decode-latency": "seconds",
    "prefill-latency": "seconds",
}
# absolute amounts: bytes take KB/MB/GB (1000s) or KiB/MiB/GiB (1024s); counts take K/M/G
_BYTE_SUFFIXES = {
    "b": 1,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}
_COUNT_SUFFIXES = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9, "t": 1e12}
_TIME_SUFFIXES = {"s": 1, "ms": 1e-3, "us": 1e-6}
_SUFFIXES = {"bytes": _BYTE_SUFFIXES, "seconds": _TIME_SUFFIXES}
_SUFFIX_NAMES = {"bytes": "B, KB, MB, GB, KiB, MiB, GiB", "seconds": "s, ms, us"}


@dataclass(frozen=True)
class Cost:
    """A plan's cost under one measure (module docstring)."""

    layout: ModelLayout
    measure: str = "params"
    accounting: str = "exact"  # params only
    dtype_bytes: int = 4  # weights-bytes and kv-bytes
    context: int = 512  # flops and kv-bytes
    latency: LatencyTable | None = None  # the latency measures' timings on this device (latency.py)

    def __post_init__(self):
        if self.measure not in MEASURES:
            raise ValueError(f"unknown cost measure {self.measure!r}; choose one of {', '.join(MEASURES)}")
        if self.measure in LATENCY_MEASURES and self.latency is None:
            raise ValueError(f"internal: the {self.measure} measure needs this device's latency table")

    @property
    def unit(self) -> str:
        return UNITS[self.measure]

    def of(self, plan: PruningPlan) -> float:
        """The cost of ``plan`` (of the dense model for a dense plan)."""
        layout = self.layout
        if self.latency is not None:
            return self.latency.of(plan)
        if self.measure == "params":
            return float(plan.num_params(layout, self.accounting))
        if self.measure == "weights-bytes":
            return float(plan.num_params(layout) * self.dtype_bytes)
        total = 2.0 * layout.hidden_size * layout.vocab_size if self.measure == "flops" else 0.0
        for i in range(plan.num_layers):
            if i not in plan.removed_attention:
                total += self._attention(i, plan.attention_width[i])
            if i not in plan.removed_mlp and self.measure == "flops":
                h, w = layout.hidden_size, plan.mlp_width[i]
                total += 2.0 * (layout.num_mlp_in_projs * h * w + w * h)
        return total

    def _attention(self, layer: int, q_width: int) -> float:
        layout = self.layout
        if self.latency is not None:
            return self.latency.branch_s("attention", q_width)
        kv_width = layout.heads.kv_width(q_width)
        window = layout.attention_windows[layer] if layout.attention_windows else 0
        span = min(self.context, window) if window else self.context
        if self.measure == "kv-bytes":  # a sliding layer's cache keeps what the next token will attend to
            held = min(self.context, window - 1) if window else self.context
            return 2.0 * kv_width * held * self.dtype_bytes
        h = layout.hidden_size
        projections = 2.0 * (h * q_width + 2 * h * kv_width + q_width * h)
        return projections + 4.0 * q_width * span  # scores and the weighted sum of values

    def dense(self) -> float:
        return self.of(PruningPlan.dense(self.layout))

    def reduction(self, plan: PruningPlan) -> float:
        """Percent of the dense model's cost that ``plan`` removes."""
        return 100.0 * (1.0 - self.of(plan) / self.dense())

    def saved(self, plan: PruningPlan, smaller: PruningPlan) -> float:
        """What going from ``plan`` to ``smaller`` saves."""
        return self.of(plan) - self.of(smaller)

    def smallest_plan(self, mlp_group: int, attention_group: int) -> PruningPlan:
        """The cheapest plan a search can reach: every MLP block removed, one attention block kept, at the
        narrowest width its groups leave (a model needs one attention block to stay a sequence model)."""
        layout = self.layout
        full = layout.attention_width
        narrowest = full % attention_group or attention_group
        plan = PruningPlan.dense(layout)
        kept = min(range(layout.num_layers), key=lambda i: (self._attention(i, narrowest), i))
        plan = replace(
            plan,
            removed_mlp=frozenset(range(layout.num_layers)),
            removed_attention=frozenset(range(layout.num_layers)) - {kept},
        )
        return plan.with_width("attention", kept, narrowest)

    def format(self, amount: float) -> str:
        if self.unit == "seconds":
            return f"{amount * 1e3:.4g} ms"
        if self.unit == "bytes":
            for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
                if amount >= size:
                    return f"{amount / size:.4g} {unit}"
            return f"{amount:.0f} bytes"
        for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
            if amount >= size:
                return f"{amount / size:.4g}{unit} {self.unit}"
        return f"{amount:.0f} {self.unit}"


class BudgetError(ValueError):
    """A budget's text that cannot be read."""


@dataclass(frozen=True)
class Budget:
    """How much of a measure to remove: ``percent`` of it, a ``factor`` (the cost divided by it), or the
    ``amount`` to end at."""

    measure: str
    value: float
    form: str  # "percent" | "factor" | "amount"

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``MEASURE=VALUE``: e.g. ``params=20%``, ``weights=400MB``, ``kv=50%``, ``flops=1.25x``."""
        name, sep, value = text.partition("=")
        measure = _SHORT_NAMES.get(name.strip().lower(), name.strip().lower())
        if not sep or measure not in MEASURES:
            raise BudgetError(
                f"budget {text!r}: give MEASURE=VALUE with a measure of {', '.join(MEASURES)} (e.g. "
                "params=20%, weights=400MB, kv=50%, flops=1.25x)"
            )
        value = value.strip().lower().replace(" ", "")
        number = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)([a-z%]*)", value)
        if number is None:
            raise BudgetError(f"budget {text!r}: {value!r} is not a number with an optional unit")
        amount, suffix = float(number.group(1)), number.group(2)
        if suffix == "%":
            if not 0 < amount < 100:
                raise BudgetError(f"budget {text!r}: a percent to remove must be in (0, 100)")
            return cls(measure, amount, "percent")
        if suffix == "x":
            if not amount > 1:
                raise BudgetError(f"budget {text!r}: a factor must be more than 1 (2x: half the cost)")
            return cls(measure, amount, "factor")
        scales = _SUFFIXES.get(UNITS[measure], _COUNT_SUFFIXES)
        if suffix not in scales:
            raise BudgetError(
                f"budget {text!r}: unknown unit {suffix!r} for {measure}; use % (to remove), x (a factor) or "
                + _SUFFIX_NAMES.get(UNITS[measure], "K, M, G")
            )
        if not amount > 0:
            raise BudgetError(f"budget {text!r}: the amount to end at must be positive")
        return cls(measure, amount * scales[suffix], "amount")

    def reduction(self, cost: Cost) -> float:
        """The percent of ``cost``'s dense total this budget removes."""
        if self.form == "percent":
            return self.value
        if self.form == "factor":
            return 100.0 * (1.0 - 1.0 / self.value)
        return 100.0 * (1.0 - self.value / cost.dense())

    def written(self, cost: Cost, reduction: float) -> str:
        """``reduction`` (percent of the dense cost removed) written as this budget writes its value."""
        if self.form == "factor":
            return f"{self.measure}={1.0 / (1.0 - reduction / 100.0):.3g}x"
        if self.form == "amount":
            return f"{self.measure}={cost.format(cost.dense() * (1.0 - reduction / 100.0))}".replace(" ", "")
        return f"{self.measure}={reduction:.2f}%"

    def describe(self, cost: Cost) -> str:
        if self.form == "percent":
            return f"{self.measure} -{self.value:g} %"
        if self.form == "factor":
            return f"{self.measure} /{self.value:g}"
        return f"{self.measure} <= {cost.format(self.value)}"
