"""Everything a report shows about one run, read only through the run directory's typed readers.

A value the run did not record stays None (the report prints "—"): the report never guesses a number
from a neighbouring one, so what it shows is what the run measured or what follows exactly from it.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..core.layout import ModelLayout
from ..core.plan import PlanError, PruningPlan
from ..evaluation.results import PAPER_TASKS, EvalResult, Metric
from ..run.run_dir import MODEL_STAGES, DenseRecord, RunDirectory, RunDirError, RunManifest
from ..search.latency import LATENCY_MEASURES
from ..search.loop import StepRecord
from ..search.objective import SCORE_NAMES
from ..search.settings import SearchSettings
from ..search.stages import STAGES
from ..settings import from_dict

log = logging.getLogger(__name__)

STAGE_ORDER = tuple(stage.name for stage in STAGES)
STAGE_CALIBRATION = {stage.name: stage.calibration for stage in STAGES}  # stage -> calibration set
CALIBRATION_SETS = ("block", "width")
TASK_LABELS = {
    "piqa": "PIQA",
    "winogrande": "WinoGrande",
    "hellaswag": "HellaSwag",
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
    "boolq": "BoolQ",
    "openbookqa": "OpenBookQA",
    "wikitext2": "WikiText-2",
    "ptb": "PTB",
    "c4": "C4",
}


def task_label(task: str) -> str:
    return TASK_LABELS.get(task, task)


# --- tasks of a dense/pruned pair of results (shared by the table and the comparison figure) ---------
def _union(results: tuple[EvalResult | None, ...], perplexity: bool) -> list[str]:
    seen: dict[str, None] = {}
    for result in results:
        if result is not None:
            seen.update(dict.fromkeys(result.perplexity_tasks() if perplexity else result.accuracy_tasks()))
    known = [t for t in TASK_LABELS if t in seen]  # paper order first, then the others as they came
    return known + [t for t in seen if t not in TASK_LABELS]


def perplexity_tasks(*results: EvalResult | None) -> list[str]:
    return _union(results, perplexity=True)


def accuracy_tasks(*results: EvalResult | None) -> list[str]:
    return _union(results, perplexity=False)


def comparison_metric(task: str, *results: EvalResult | None) -> str:
    """The headline metric of the first result that ran ``task``: both models are shown on that one."""
    return next(r.headline(task)[0] for r in results if r is not None and task in r.tasks)


def metric_of(result: EvalResult | None, task: str, metric: str) -> Metric | None:
    return None if result is None else result.tasks.get(task, {}).get(metric)


def shared_accuracy_tasks(*results: EvalResult | None) -> list[str]:
    """Accuracy tasks every model ran: the only ones a mean may compare."""
    if not results or any(r is None for r in results):
        return []
    common = set.intersection(*(set(r.accuracy_tasks()) for r in results))
    return [t for t in accuracy_tasks(results[0]) if t in common]


def mean_label(tasks: list[str]) -> str:
    if set(tasks) == set(PAPER_TASKS):
        return f"Mean of the paper's {len(tasks)} tasks"
    return f"Mean of {len(tasks)} tasks ({', '.join(task_label(t) for t in tasks)})"


# --- the run ---------------------------------------------------------------------------------------
def score_name(search: dict, calibration: str) -> str:
    """What a run's scores on a calibration set are, from its stored search settings (a run made before
    --objective resumes, and is named, as its settings' unrecorded values say)."""
    return SCORE_NAMES[from_dict(SearchSettings, search).objective_for(calibration)]


@dataclass(frozen=True)
class RunData:
    run_dir: Path
    manifest: RunManifest | None
    dense: DenseRecord | None
    steps: tuple[StepRecord, ...]
    plan: PruningPlan | None
    layout: ModelLayout | None
    eval_dense: EvalResult | None
    eval_pruned: EvalResult | None
    bench: dict | None
    # every stage's evaluation that the run holds, in order (pruned, compensated, recovered)
    stage_evals: tuple[tuple[str, EvalResult], ...] = ()
    # the model directories the run saved, in the same order
    saved_models: tuple[tuple[str, Path], ...] = ()

    def score_name(self, calibration: str) -> str:
        """What the scores on a calibration set are (runs before --objective scored by NLL)."""
        return score_name(self.manifest.settings.get("search", {}) if self.manifest else {}, calibration)

    @property
    def score_label(self) -> str:
        """The steps' scores, named once when both sets have the same, else per stage."""
        block, width = self.score_name("block"), self.score_name("width")
        return block if block == width else f"{block} (block steps), {width} (width steps)"

    @property
    def dense_params(self) -> int | None:
        if self.layout is not None:
            return self.layout.dense_params()
        if self.eval_pruned is not None and self.eval_pruned.meta.dense_params:
            return self.eval_pruned.meta.dense_params
        if self.eval_dense is not None and self.eval_dense.meta.params:
            return self.eval_dense.meta.params
        return self.dense.params if self.dense is not None and self.dense.params else None

    @property
    def pruned_params(self) -> int | None:
        if self.plan is not None and self.layout is not None:
            return self.plan.num_params(self.layout)
        if self.eval_pruned is not None and self.eval_pruned.meta.params:
            return self.eval_pruned.meta.params
        return self.steps[-1].params if self.steps else None

    @property
    def final_ratio(self) -> float | None:
        """Percent of the dense parameters removed by the final plan."""
        if self.plan is not None and self.layout is not None:
            return self.plan.ratio(self.layout)
        if self.eval_pruned is not None and self.eval_pruned.meta.dense_params:
            return self.eval_pruned.meta.ratio
        return self.steps[-1].ratio if self.steps else None

    @property
    def search_wall_s(self) -> float | None:
        """Dense scoring plus every step; loading and evaluation are not part of the search."""
        if self.dense is None and not self.steps:
            return None
        return (self.dense.elapsed_s if self.dense else 0.0) + sum(s.elapsed_s for s in self.steps)

    @property
    def steps_per_stage(self) -> dict[str, int]:
        counts = Counter(s.stage for s in self.steps)
        order = [s for s in STAGE_ORDER if s in counts] + sorted(s for s in counts if s not in STAGE_ORDER)
        return {stage: counts[stage] for stage in order}

    @property
    def final_ppl(self) -> dict[str, float]:
        """Calibration set -> the final plan's perplexity on it (as recorded; absent sets are left out)."""
        search = (self.manifest.phases.get("search") or {}) if self.manifest else {}
        if search.get("final_ppl"):
            return {k: float(v) for k, v in search["final_ppl"].items() if v is not None}
        if not self.steps or self.steps[-1].stage not in STAGE_CALIBRATION:
            return {}
        last = self.steps[-1]
        return {STAGE_CALIBRATION[last.stage]: last.ppl}

    def ppl_after_stage(self, stage: str) -> float | None:
        return next((s.ppl for s in reversed(self.steps) if s.stage == stage), None)

    @property
    def racing(self) -> tuple[int, int, int] | None:
        """(skipped, full LM heads avoided, total) candidate-batches over the search; None for runs that did
        not count them (runs from before the head bound count 0 avoided heads)."""
        total = sum(s.total_batches for s in self.steps)
        if not total:
            return None
        return sum(s.skipped_batches for s in self.steps), sum(s.bounded_batches for s in self.steps), total

    @property
    def evaluations(self) -> tuple[tuple[str, EvalResult], ...]:
        """Every evaluation the run holds: the dense model's, then each stage's."""
        dense = (("dense", self.eval_dense),) if self.eval_dense is not None else ()
        return dense + self.stage_evals

    @property
    def budget(self) -> str | None:
        """The budget a run was given (--budget, or --distribution auto) and what its steps reached of
        the budget's measure (counted on the plan, which is what the extracted model measures:
        tests/test_budget.py); None for a plain ratio."""
        search = (self.manifest.settings.get("search") or {}) if self.manifest else {}
        if not (search.get("budget") or search.get("distribution") == "auto"):
            return None
        settings = from_dict(SearchSettings, search)
        target = settings.budget or f"params={settings.target_ratio:g}%"
        last = self.steps[-1] if self.steps else None
        reached = (
            "nothing yet"
            if last is None or last.reduction is None
            else f"{last.reduction:.2f} % less {last.measure}"
        )
        if last is not None and last.measure in LATENCY_MEASURES:
            reached += " (the device's latency table's estimate)"
            checked = (self.bench or {}).get("budget") or {}
            if "measured_speedup" in checked:
                reached += (
                    f"; `bench` measured a {checked['measured_speedup']:.3f}x {checked['workload'][0]} speed-up "
                    f"(median of {checked.get('repeats', '?')})"
                )
        return f"{target}{' (--distribution auto)' if settings.auto else ''}; reached {reached}"

    @property
    def head_dim(self) -> int | None:
        return self.layout.head_dim if self.layout else None


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory; it must hold run.json, steps.jsonl or plan.json (else RunDirError)."""
    directory = RunDirectory(run_dir)
    if not directory.path.is_dir():
        raise RunDirError(f"run directory {directory.path} does not exist (or is not a directory)")
    files = (directory.manifest_file, directory.steps_file, directory.plan_file)
    if not any(f.is_file() for f in files):
        raise RunDirError(
            f"{directory.path} is not a multipruner run directory: it has none of "
            f"{', '.join(f.name for f in files)}; nothing to report"
        )
    steps = tuple(_step(directory, r) for r in directory.step_records())
    stored = directory.plan()
    plan, layout = stored if stored is not None else (_plan_of_last_step(directory, steps), None)
    return RunData(
        run_dir=directory.path,
        manifest=directory.manifest() if directory.exists() else None,
        dense=directory.dense_record(),
        steps=steps,
        plan=plan,
        layout=layout,
        eval_dense=_eval(directory.eval_file("dense")),
        eval_pruned=_eval(directory.eval_file("pruned")),
        bench=_bench(directory.bench_file),
        stage_evals=tuple(
            (stage, result)
            for stage in MODEL_STAGES
            if (result := _eval(directory.eval_file(stage))) is not None
        ),
        saved_models=tuple(
            (stage, path) for stage in MODEL_STAGES if (path := directory.stage_dir(stage)).is_dir()
        ),
    )


def _step(directory: RunDirectory, record: dict) -> StepRecord:
    try:
        return StepRecord.from_dict(record)
    except TypeError as err:
        raise RunDirError(f"{directory.steps_file}: step {record.get('step')} is incomplete ({err})") from err


def _plan_of_last_step(directory: RunDirectory, steps: tuple[StepRecord, ...]) -> PruningPlan | None:
    """Without plan.json, the last step's plan; a reference-format one needs a layout, which is then absent."""
    if not steps or "format" not in steps[-1].plan:
        return None
    try:
        return PruningPlan.from_dict(steps[-1].plan)
    except PlanError as err:
        raise RunDirError(f"{directory.steps_file}: plan of step {steps[-1].step}: {err}") from err


def _eval(path: Path) -> EvalResult | None:
    return EvalResult.read(path) if path.is_file() else None


def _bench(path: Path) -> dict | None:
    """bench.json is ``speed_comparison.compare_speed``'s dict; it has no reader of its own."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunDirError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise RunDirError(f"{path} is not a speed comparison (multipruner bench --output)")
    return data
