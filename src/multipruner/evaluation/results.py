"""The result of evaluating one model: a ``tasks`` map (task -> metric -> value, stderr, n) and ``meta``.

Perplexity texts are tasks too (metric ``ppl``, n = windows), so everything reads one shape. Files are
written with :meth:`EvalResult.write` (JSON, plus a CSV in the reference's column layout) and read with
:meth:`EvalResult.read`; :meth:`EvalResult.format_table` is the table ``multipruner eval`` prints.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..io_utils import atomic_write_text
from ..tables import render_table

EVAL_FORMAT = "multipruner-eval/1"
PPL = "ppl"
# The paper's zero-shot average (MultiPruner Table 1).
PAPER_TASKS: tuple[str, ...] = ("piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge")


class EvalFileError(UsageError):
    """An evaluation file that cannot be read."""


@dataclass(frozen=True)
class Metric:
    value: float
    stderr: float | None = None
    n: int | None = None  # examples (zero-shot) or windows (perplexity)


@dataclass(frozen=True)
class EvalMeta:
    model: str = ""
    params: int = 0
    dense_params: int | None = None  # known when the model is a pruned one
    limit: int | None = None  # examples per zero-shot task
    seqlen: int | None = None  # perplexity window
    dtype: str = ""
    device: str = ""
    wall_s: float | None = None

    @property
    def ratio(self) -> float:
        """Percent of the dense model's parameters removed (0 for a dense model)."""
        return 100.0 * (1 - self.params / self.dense_params) if self.dense_params else 0.0


def headline_metric(metrics: dict[str, Metric] | dict[str, dict]) -> str:
    """The metric the paper reports for a task: acc_norm where the task has it, else acc (ppl for texts)."""
    for name in ("acc_norm", "acc", PPL):
        value = metrics.get(name)
        if value is not None and (not isinstance(value, dict) or value.get("value") is not None):
            return name
    raise KeyError(f"no headline metric among {sorted(metrics)}")


@dataclass(frozen=True)
class EvalResult:
    meta: EvalMeta
    tasks: dict[str, dict[str, Metric]] = field(default_factory=dict)

    # --- reading values -------------------------------------------------------------
    def is_perplexity(self, task: str) -> bool:
        return PPL in self.tasks.get(task, {})

    def perplexity_tasks(self) -> list[str]:
        return [t for t in self.tasks if self.is_perplexity(t)]

    def accuracy_tasks(self) -> list[str]:
        return [t for t in self.tasks if not self.is_perplexity(t)]

    def headline(self, task: str) -> tuple[str, Metric]:
        metrics = self.tasks[task]
        name = headline_metric(metrics)
        return name, metrics[name]

    def mean_accuracy(self, tasks: list[str] | tuple[str, ...]) -> tuple[float, float] | None:
        """Mean headline accuracy over ``tasks`` and its standard error (None unless all of them ran)."""
        if not tasks or not all(t in self.tasks and not self.is_perplexity(t) for t in tasks):
            return None
        values = [self.headline(t)[1] for t in tasks]
        mean = sum(v.value for v in values) / len(values)
        errors = [v.stderr for v in values]
        stderr = (
            math.sqrt(sum(e * e for e in errors)) / len(values)
            if all(e is not None for e in errors)
            else None
        )
        return mean, stderr

    def paper_average(self) -> float | None:
        mean = self.mean_accuracy(PAPER_TASKS)
        return None if mean is None else mean[0]

    def format_table(self) -> str:
        """One row per task (perplexity, or accuracy in % with its standard error), then the size."""
        rows = []
        for task in self.tasks:
            name, metric = self.headline(task)
            value = f"{metric.value:.3f}" if name == PPL else f"{100 * metric.value:.2f}"
            error = "" if metric.stderr is None else f"± {100 * metric.stderr:.2f}"
            rows.append((task, name if name == PPL else f"{name} (%)", value, error, metric.n or ""))
        meta = self.meta
        return "\n".join(
            [
                render_table(("task", "metric", "value", "stderr", "n"), rows, align="llrrr"),
                f"{meta.params:,} parameters" + (f" ({meta.ratio:.2f}% pruned)" if meta.dense_params else ""),
            ]
        )

    # --- files ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": EVAL_FORMAT,
            "meta": asdict(self.meta),
            "tasks": {t: {m: asdict(v) for m, v in ms.items()} for t, ms in self.tasks.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> EvalResult:
        if data.get("format") != EVAL_FORMAT:
            raise EvalFileError(
                f"not a {EVAL_FORMAT} evaluation result (format {data.get('format')!r}); evaluate the model "
                "again with multipruner eval"
            )
        try:
            meta = EvalMeta(**data["meta"])
            tasks = {t: {m: Metric(**v) for m, v in ms.items()} for t, ms in data["tasks"].items()}
        except (KeyError, TypeError) as err:
            raise EvalFileError(f"malformed evaluation result: {err!r}") from err
        return cls(meta, tasks)

    def write(self, path: str | Path) -> None:
        """JSON, plus a CSV beside it with the reference's columns (params, ratio, ppl_*, accuracies in %)."""
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        row: dict[str, object] = {
            "total_params": self.meta.dense_params or self.meta.params,
            "pruned_model_params": self.meta.params,
            "ratio": round(self.meta.ratio, 4),
        }
        for task in self.perplexity_tasks():
            row[f"ppl_{task}"] = self.tasks[task][PPL].value
        for task in self.accuracy_tasks():
            row[task] = round(100 * self.headline(task)[1].value, 2)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
        atomic_write_text(path.with_suffix(".csv"), buffer.getvalue())

    @classmethod
    def read(cls, path: str | Path) -> EvalResult:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise EvalFileError(f"cannot read evaluation result {path}: {err}") from err
        if not isinstance(data, dict):
            raise EvalFileError(f"{path} does not hold an evaluation result")
        try:
            return cls.from_dict(data)
        except EvalFileError as err:
            raise EvalFileError(f"{path}: {err}") from None
