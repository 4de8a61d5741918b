"""Measured latency as a budget's measure: a short calibration on this device, stored with the run.

As ZipLM does, the latency of a plan is modelled as a sum over layers: what the model costs without
any attention or MLP branch (embeddings, norms, LM head), plus what each kept branch costs at its
width. The per-layer costs are measured on this device with the model's own layers: models in which
*every* layer has the same MLP width (or the same attention width) are extracted and timed, side by
side and repeat by repeat, so one model's time minus the time with that branch removed everywhere,
divided by the layers, is one branch's cost at that width. Widths between the timed ones are
interpolated linearly.

The workload is one of ``decode`` (one new token per sequence after ``context`` tokens, batch
``batch_size``) or ``prefill`` (a forward over ``batch_size`` sequences of ``context`` tokens).

A table holds the device, the model's layout and dtype it was measured for; a run reuses its table
on resume and refuses one from another device or model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

from ..core.layout import ModelLayout
from ..core.plan import PruningPlan
from ..errors import UsageError
from ..timing import timed

WORKLOADS = ("decode", "prefill")
LATENCY_MEASURES = {"decode-latency": "decode", "prefill-latency": "prefill"}


class LatencyTableError(UsageError):
    """A latency table that does not belong to this run's device, model or workload."""


def device_name(device: torch.device) -> str:
    """What a timing depends on: the processor (or GPU) and, on CPU, the threads torch uses."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    processor = _cpu_model() or platform.processor() or platform.machine()
    return f"cpu: {processor}, {torch.get_num_threads()} threads"


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def layout_fingerprint(layout: ModelLayout) -> str:
    return hashlib.sha256(json.dumps(layout.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class LatencyTable:
    """Seconds per workload run: ``fixed_s`` without any branch, plus one layer's branch at each timed
    width (``attention_s`` by query width, ``mlp_s`` by MLP width)."""

    device: str
    model: str  # layout_fingerprint
    dtype: str
    workload: str
    batch_size: int
    context: int
    fixed_s: float
    attention_s: dict[int, float]
    mlp_s: dict[int, float]
    repeats: int = 0
    timed_models: int = 0
    meta: dict = field(default_factory=dict)

    def branch_s(self, kind: str, width: int) -> float:
        """One layer's ``kind`` branch at ``width``, interpolated between the timed widths."""
        table = self.attention_s if kind == "attention" else self.mlp_s
        widths = sorted(table)
        if width in table:
            return table[width]
        if not widths[0] <= width <= widths[-1]:
            raise ValueError(f"internal: {kind} width {width} outside the timed {widths[0]}..{widths[-1]}")
        above = next(w for w in widths if w > width)
        below = max(w for w in widths if w < width)
        share = (width - below) / (above - below)
        return table[below] + share * (table[above] - table[below])

    def of(self, plan: PruningPlan) -> float:
        total = self.fixed_s
        for i in range(plan.num_layers):
            if i not in plan.removed_attention:
                total += self.branch_s("attention", plan.attention_width[i])
            if i not in plan.removed_mlp:
                total += self.branch_s("mlp", plan.mlp_width[i])
        return total

    def check_matches(
        self, device: str, layout: ModelLayout, dtype: str, workload: tuple[str, int, int]
    ) -> None:
        """Refuse a table measured for something else than what the run would use it for."""
        problems = []
        if self.device != device:
            problems.append(f"it was measured on {self.device!r}, this run uses {device!r}")
        if self.model != layout_fingerprint(layout) or self.dtype != dtype:
            problems.append(f"it was measured for another model or dtype ({self.dtype})")
        if (self.workload, self.batch_size, self.context) != workload:
            problems.append(
                f"it times {self.workload} at batch {self.batch_size}, context {self.context}; the budget asks "
                f"{workload[0]} at batch {workload[1]}, context {workload[2]}"
            )
        if problems:
            raise LatencyTableError(
                "the run's latency table does not fit: "
                + "; ".join(problems)
                + ". Timings do not carry over: "
                "start a new run directory (or remove latency_table.json to measure again, which changes the plan)"
            )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["attention_s"] = {str(k): v for k, v in self.attention_s.items()}
        data["mlp_s"] = {str(k): v for k, v in self.mlp_s.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> LatencyTable:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        fields["attention_s"] = {int(k): float(v) for k, v in data["attention_s"].items()}
        fields["mlp_s"] = {int(k): float(v) for k, v in data["mlp_s"].items()}
        return cls(**fields)


def timed_widths(full: int, group: int, narrowest_multiple: int = 1, most: int = 6) -> list[int]:
    """The widths a search can give a branch (``full`` less whole groups, positive, multiples of
    ``narrowest_multiple``), thinned evenly to at most ``most``, always with the full and the narrowest."""
    widths = [w for w in range(full, 0, -group) if w % narrowest_multiple == 0]
    if len(widths) <= most:
        return widths
    picks = {round(i * (len(widths) - 1) / (most - 1)) for i in range(most)}
    return [widths[i] for i in sorted(picks)]


def measure_table(
    layout: ModelLayout,
    widths: dict[str, Sequence[int]],
    timers: Callable[[Sequence[PruningPlan]], Callable[[int], float]],
    repeats: int,
    describe: dict,
) -> LatencyTable:
    """Time the uniform-width models and fit the table (module docstring).

    ``timers(plans)`` prepares the models and returns ``time(k)``, the seconds of one workload run of
    plan k; every repeat times every plan once, in turn, and each plan keeps its median.
    ``describe``: device, model, dtype, workload, batch_size, context."""
    n = layout.num_layers
    dense = PruningPlan.dense(layout)
    all_layers = frozenset(range(n))
    # attention is timed with layer 0's kept at full width: a model needs one attention block
    plans = {"dense": dense, "no mlp": replace(dense, removed_mlp=all_layers)}
    plans["no attention"] = replace(dense, removed_attention=all_layers - {0})
    for w in widths["mlp"]:
        plans[f"mlp {w}"] = replace(dense, mlp_width=(w,) * n)
    for q in widths["attention"]:
        plans[f"attention {q}"] = replace(dense, attention_width=(layout.attention_width,) + (q,) * (n - 1))
    names = list(plans)
    time_plan = timers([plans[name] for name in names])
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for k, name in enumerate(names):
            samples[name].append(time_plan(k))
    median = {name: statistics.median(values) for name, values in samples.items()}
    # a branch too cheap to tell from the timing noise costs nothing, never less
    mlp_s = {w: max(0.0, (median[f"mlp {w}"] - median["no mlp"]) / n) for w in widths["mlp"]}
    attention_s = {
        q: max(0.0, (median[f"attention {q}"] - median["no attention"]) / max(n - 1, 1))
        for q in widths["attention"]
    }
    full_attention = attention_s.get(layout.attention_width, median["dense"] - median["no attention"])
    fixed = median["dense"] - n * mlp_s[layout.mlp_width] - n * full_attention
    return LatencyTable(
        **describe,
        fixed_s=fixed,
        attention_s=attention_s,
        mlp_s=mlp_s,
        repeats=repeats,
        timed_models=len(names),
        meta={"medians_s": median},
    )


def workload_timer(model: torch.nn.Module, workload: str, batch_size: int, context: int, tokens: int = 8):
    """Seconds of one workload run of ``model``: a prefill forward, or (decode) the mean of ``tokens``
    single-token steps after ``context`` - 1 cached tokens, the cache cropped back after each."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (batch_size, context), generator=generator).to(device)

    @torch.inference_mode()
    def run() -> float:
        if workload == "prefill":
            return timed(lambda: model(input_ids=ids, use_cache=False), device)[0]
        prefilled = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
        total = 0.0
        for _ in range(tokens):
            cache = copy.deepcopy(prefilled)  # each token decodes after the same context
            total += timed(lambda c=cache: model(input_ids=ids[:, -1:], cache=c, use_cache=True), device)[0]
        return total / tokens

    run()  # warm-up
    return run


def time_table(
    prunable, workload: tuple[str, int, int], groups: tuple[int, int], repeats: int = 3
) -> LatencyTable:
    """Time ``prunable``'s model on this device for ``workload`` (decode or prefill, batch, context), with
    the widths a search with MLP / attention ``groups`` can reach."""
    from ..core.extract import extract  # the search's modules do not otherwise build models

    layout = prunable.layout
    mlp_group, attention_group = groups
    widths = {
        "mlp": timed_widths(layout.mlp_width, mlp_group),
        "attention": timed_widths(layout.attention_width, attention_group, layout.heads.unit_channels),
    }
    weights = next(prunable.model.parameters())

    def timers(plans: Sequence[PruningPlan]) -> Callable[[int], float]:
        runs = [workload_timer(extract(prunable, plan), *workload) for plan in plans]
        return lambda k: runs[k]()

    kind, batch_size, context = workload
    describe = dict(
        device=device_name(weights.device),
        model=layout_fingerprint(layout),
        dtype=str(weights.dtype).removeprefix("torch."),
        workload=kind,
        batch_size=batch_size,
        context=context,
    )
    return measure_table(layout, widths, timers, repeats, describe)


def measured_speedup(
    dense: torch.nn.Module, pruned: torch.nn.Module, workload: Sequence, repeats: int
) -> float:
    """The dense model's median time over the pruned model's, on the workload a latency table times,
    the two timed in turn repeat by repeat (``bench`` checks a latency budget with it)."""
    kind, batch_size, context = workload
    runs = [workload_timer(model, kind, batch_size, context) for model in (dense, pruned)]
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for k, run in enumerate(runs):
            times[k].append(run())
    return statistics.median(times[0]) / statistics.median(times[1])
