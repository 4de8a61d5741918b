"""Zero-shot accuracy through lm-evaluation-harness, from local data files.

The MultiPruner paper reports lm-eval's stock zero-shot tasks (PIQA, WinoGrande, HellaSwag,
ARC-e, ARC-c). Those tasks download hub datasets; multipruner must also run offline. So each
task here has an ``mp_<task>`` YAML in ``tasks/`` that copies the stock task's prompt, target,
choices and metrics verbatim and replaces only the data source with a reader of the task's
original release file (``tasks/utils.py``). The file path is filled into the task config at
run time; without a local file, and with the hub reachable, the stock hub task is used instead.

Scores are comparable with lm-eval's stock numbers on the same examples. One known deviation:
the offline HellaSwag file is a derived text format that lost the ``ctx_a``/``ctx_b`` split, so
stock's ``ctx_b.capitalize()`` is reconstructed heuristically (see ``tasks/utils.py``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..hub_datasets import offline_variable
from ..shared_data import DATA_DIR_ENV, expected_data_dir, shared_data_dir
from .results import Metric, headline_metric

if TYPE_CHECKING:
    from lm_eval.api.task import Task
    from lm_eval.tasks import TaskManager

__all__ = [
    "SUPPORTED_TASKS",
    "TASK_SPECS",
    "TaskDataError",
    "TaskSpec",
    "build_tasks",
    "default_data_dir",
    "evaluate_zero_shot",
    "local_task_config",
    "resolve_task_files",
]

logger = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


class TaskDataError(UsageError):
    """A requested task cannot run: unknown name, or no data reachable for it."""


@dataclass(frozen=True)
class TaskSpec:
    """One zero-shot task: where its local data lives and which lm-eval tasks run it."""

    name: str  # the stock lm-eval task name; also the key in our results
    local_task: str  # our YAML (tasks/<local_task>.yaml), reads a local file
    default_file: str  # relative to the data dir
    file_format: str  # for error messages: what a user-supplied file must look like


_TASK_TABLE: tuple[TaskSpec, ...] = (
    TaskSpec(
        "piqa", "mp_piqa", "piqa/valid.jsonl", "PIQA jsonl (goal, sol1, sol2) + <stem>-labels.lst beside it"
    ),
    TaskSpec(
        "winogrande",
        "mp_winogrande",
        "winogrande/dev.jsonl",
        'WinoGrande jsonl (sentence with "_", option1, option2, answer "1"/"2")',
    ),
    TaskSpec(
        "hellaswag",
        "mp_hellaswag",
        "hellaswag/hellaswag_val_full.txt",
        "original HellaSwag .jsonl, or the derived 6-lines-per-item .txt",
    ),
    TaskSpec(
        "arc_easy",
        "mp_arc_easy",
        "arc/ARC-Easy-Test.jsonl",
        "AI2 ARC jsonl (question: {stem, choices}, answerKey)",
    ),
    TaskSpec(
        "arc_challenge",
        "mp_arc_challenge",
        "arc/ARC-Challenge-Test.jsonl",
        "AI2 ARC jsonl (question: {stem, choices}, answerKey)",
    ),
    TaskSpec("boolq", "mp_boolq", "boolq/val.jsonl", "BoolQ jsonl (question, passage, label true/false)"),
    TaskSpec(
        "openbookqa",
        "mp_openbookqa",
        "openbookqa/test.tsv",
        "OpenBookQA test.tsv, or AI2 jsonl (question: {stem, choices}, answerKey)",
    ),
)
TASK_SPECS: Mapping[str, TaskSpec] = MappingProxyType({spec.name: spec for spec in _TASK_TABLE})
SUPPORTED_TASKS: tuple[str, ...] = tuple(TASK_SPECS)


# --------------------------------------------------------------------------- resolution
def default_data_dir() -> Path:
    """The shared offline data folder (see ``shared_data_dir``); when there is none, the place it is
    looked for last, so error messages still name a concrete folder."""
    return shared_data_dir() or expected_data_dir()


def _normalize_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Accept ``"piqa,boolq"`` or a list; drop duplicates, keep order; reject unknown names."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    if not names:
        raise TaskDataError(f"no task given; supported tasks: {', '.join(SUPPORTED_TASKS)}")
    unknown = [n for n in names if n not in TASK_SPECS]
    if unknown:
        raise TaskDataError(f"unknown task(s) {unknown}; supported tasks: {', '.join(SUPPORTED_TASKS)}")
    return names


def _missing_file_error(spec: TaskSpec, path: Path) -> TaskDataError:
    return TaskDataError(
        f"task {spec.name!r}: local data file {path} not found and the hub is offline "
        f"(HF_HUB_OFFLINE=1). Pass a file with overrides={{{spec.name!r}: '/path/to/file'}} "
        f"({spec.file_format}), point ${DATA_DIR_ENV} at a data folder holding {spec.default_file}, "
        "or go online to use the stock hub task."
    )


def _resolve_one(spec: TaskSpec, data_dir: Path, override: str | os.PathLike | None) -> Path | None:
    """User file (must exist) > file in the data dir > stock hub task (only when online)."""
    if override is not None:
        path = Path(override).expanduser()
        if not path.is_file():
            raise TaskDataError(f"task {spec.name!r}: file given for it does not exist: {path}")
        return path.resolve()
    path = data_dir / spec.default_file
    if path.is_file():
        return path.resolve()
    if offline_variable():
        raise _missing_file_error(spec, path)
    logger.info("%s: no local file at %s; using the stock lm-eval hub task", spec.name, path)
    return None


def resolve_task_files(
    tasks: str | Sequence[str],
    data_dir: str | os.PathLike | None = None,
    overrides: Mapping[str, str | os.PathLike] | None = None,
) -> dict[str, Path | None]:
    """Map each task to its local data file, or None to run the stock hub task.

    Raises TaskDataError for an unknown task (also in ``overrides``), a user file that does
    not exist, or a missing local file while offline.
    """
    names = _normalize_tasks(tasks)
    overrides = dict(overrides or {})
    if bad := sorted(set(overrides) - set(TASK_SPECS)):
        raise TaskDataError(
            f"overrides for unknown task(s) {bad}; supported tasks: {', '.join(SUPPORTED_TASKS)}"
        )
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    return {name: _resolve_one(TASK_SPECS[name], root, overrides.get(name)) for name in names}


# --------------------------------------------------------------------------- task building
def local_task_config(task: str, data_file: str | os.PathLike) -> dict[str, Any]:
    """The ``mp_<task>`` YAML as a config dict, with the data file filled in.

    lm-eval's ``load_yaml`` resolves ``include`` and ``!function`` exactly as for its own
    tasks; TaskManager then builds the task from the dict (an inline config).
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    spec = TASK_SPECS[_normalize_tasks([task])[0]]
    cfg = load_yaml(TASKS_DIR / f"{spec.local_task}.yaml", resolve_func=True)
    cfg["dataset_kwargs"] = {**(cfg.get("dataset_kwargs") or {}), "data_file": str(data_file)}
    return cfg


def _task_manager(need_stock: bool) -> TaskManager:
    """Index lm-eval's bundled YAMLs only when a stock (hub) task is needed: it takes seconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=need_stock)


def build_tasks(files: Mapping[str, Path | None], task_manager: TaskManager | None = None) -> dict[str, Task]:
    """Instantiate lm-eval tasks (loading their data) keyed by plain task name.

    Loading errors are re-raised as TaskDataError naming the task and its file.
    """
    manager = task_manager or _task_manager(any(path is None for path in files.values()))
    built: dict[str, Task] = {}
    for name, path in files.items():
        spec = local_task_config(name, path) if path is not None else name
        try:
            loaded = manager.load([spec])["tasks"]
        except (OSError, KeyError, ValueError, TypeError) as err:
            source = path if path is not None else "the stock hub task"
            raise TaskDataError(f"task {name!r}: could not load data from {source}: {err}") from err
        built[name] = next(iter(loaded.values()))
    return built


# --------------------------------------------------------------------------- evaluation
def _metric(task_results: Mapping[str, Any], metric: str, n: int) -> Metric | None:
    """lm-eval keys metrics as ``"<metric>,<filter>"`` (the filter is ``none`` here) and their standard
    errors as ``"<metric>_stderr,<filter>"``."""
    value = task_results.get(f"{metric},none")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    stderr = task_results.get(f"{metric}_stderr,none")
    stderr = float(stderr) if isinstance(stderr, int | float) and math.isfinite(stderr) else None
    return Metric(float(value), stderr, n)


def _summarize(raw: Mapping[str, Any], lm_names: Mapping[str, str]) -> dict[str, dict[str, Metric]]:
    """acc and acc_norm (where the task has it), with standard error and count, per task."""
    summary = {}
    for lm_name, name in lm_names.items():
        res = raw["results"][lm_name]
        n_samples = raw.get("n-samples", {}).get(lm_name, {})
        n = int(n_samples.get("effective", n_samples.get("original", 0)))
        metrics = {m: _metric(res, m, n) for m in ("acc", "acc_norm")}
        summary[name] = {m: v for m, v in metrics.items() if v is not None}
    return summary


def _simple_evaluate(
    model: Any,
    tokenizer: Any,
    tasks: str | Sequence[str],
    *,
    limit: int | None,
    batch_size: int,
    data_dir: str | os.PathLike | None,
    overrides: Mapping[str, str | os.PathLike] | None,
    device: str | None,
    log_samples: bool = False,
) -> tuple[dict[str, Any], dict[str, str]]:
    """lm-eval's raw results for the tasks, and each lm-eval task name's plain name."""
    import torch
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    files = resolve_task_files(tasks, data_dir=data_dir, overrides=overrides)
    manager = _task_manager(any(path is None for path in files.values()))
    built = build_tasks(files, manager)
    lm_names = {task.task_name: name for name, task in built.items()}
    logger.info("zero-shot: %s (limit=%s)", {n: str(p) if p else "hub" for n, p in files.items()}, limit)

    if device is not None and torch.device(device) != model.device:
        model.to(device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    raw = evaluator.simple_evaluate(
        model=lm,
        tasks=list(built.values()),
        num_fewshot=0,
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
        # Loglikelihood scoring is deterministic; don't reseed the caller's global RNGs.
        random_seed=None,
        numpy_random_seed=None,
        torch_random_seed=None,
    )
    return raw, lm_names


def evaluate_zero_shot(
    model: Any,
    tokenizer: Any,
    tasks: str | Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    data_dir: str | os.PathLike | None = None,
    overrides: Mapping[str, str | os.PathLike] | None = None,
    device: str | None = "cpu",
) -> dict[str, Any]:
    """Zero-shot accuracy of an in-memory HF causal LM on the given tasks.

    The model is moved to ``device`` in place when it is elsewhere (lm-eval's HFLM evaluates a
    passed-in model where it lives); ``device=None`` leaves it where it is (e.g. sharded models).

    Returns ``{task: {"acc": Metric, "acc_norm": Metric}}``: accuracies are fractions with lm-eval's
    standard errors and the number of examples scored; ``acc_norm`` is absent for tasks whose stock
    metrics lack it (boolq, winogrande).
    """
    raw, lm_names = _simple_evaluate(
        model,
        tokenizer,
        tasks,
        limit=limit,
        batch_size=batch_size,
        data_dir=data_dir,
        overrides=overrides,
        device=device,
    )
    return _summarize(raw, lm_names)


@dataclass(frozen=True)
class AnswerCounts:
    """Which answer a model picks on a multiple-choice task, by choice position, against the gold one.

    A near-chance accuracy reads differently when the model gives one answer to everything: on a
    yes/no task it then scores the share of that answer among the gold labels, whatever it knows.
    """

    task: str
    choices: tuple[str, ...]  # the positions' names: the choices' texts where all examples share them
    picked: tuple[int, ...]  # per position: examples where the model's answer (``acc``'s argmax) is it
    gold: tuple[int, ...]  # per position: examples whose gold answer is it
    correct: int

    @property
    def examples(self) -> int:
        return sum(self.gold)


def _gold_position(sample: Mapping[str, Any]) -> int:
    """The gold answer's position: lm-eval gives an index, or the answer's text (matched to a choice)."""
    target = sample["target"]
    if isinstance(target, int):
        return target
    continuations = [str(args[1]).strip() for args in sample["arguments"]]
    return continuations.index(str(target).strip())


def answer_counts(
    model: Any,
    tokenizer: Any,
    task: str,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    data_dir: str | os.PathLike | None = None,
    overrides: Mapping[str, str | os.PathLike] | None = None,
    device: str | None = "cpu",
) -> AnswerCounts:
    """Count the answers ``model`` picks on one multiple-choice task (the unnormalised ``acc`` rule:
    the choice with the highest log-likelihood), per choice position, beside the gold answers'."""
    raw, lm_names = _simple_evaluate(
        model,
        tokenizer,
        [task],
        limit=limit,
        batch_size=batch_size,
        data_dir=data_dir,
        overrides=overrides,
        device=device,
        log_samples=True,
    )
    samples = raw["samples"][next(iter(lm_names))]
    width = max(len(s["filtered_resps"]) for s in samples)
    picked, gold, correct = [0] * width, [0] * width, 0
    for sample in samples:
        logliks = [float(resp[0]) for resp in sample["filtered_resps"]]
        choice = max(range(len(logliks)), key=logliks.__getitem__)
        answer = _gold_position(sample)
        picked[choice] += 1
        gold[answer] += 1
        correct += choice == answer
    texts = {tuple(str(args[1]).strip() for args in s["arguments"]) for s in samples}
    # name positions by their text when every example offers the same choices (yes/no), else by number
    choices = texts.pop() if len(texts) == 1 else tuple(str(i + 1) for i in range(width))
    return AnswerCounts(next(iter(lm_names.values())), choices, tuple(picked), tuple(gold), correct)


def example_scores(
    model: Any,
    tokenizer: Any,
    tasks: str | Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    data_dir: str | os.PathLike | None = None,
    overrides: Mapping[str, str | os.PathLike] | None = None,
    device: str | None = "cpu",
) -> dict[str, dict[int, float]]:
    """Each example's headline score (acc_norm where the task has it, else acc: 0 or 1) by document id,
    per task. Two models scored on the same examples can then be compared pairwise, whose standard
    error is far smaller than that of two independent accuracies."""
    raw, lm_names = _simple_evaluate(
        model,
        tokenizer,
        tasks,
        limit=limit,
        batch_size=batch_size,
        data_dir=data_dir,
        overrides=overrides,
        device=device,
        log_samples=True,
    )
    scores = {}
    for lm_name, name in lm_names.items():
        samples = raw["samples"][lm_name]
        metric = headline_metric({key: samples[0].get(key) for key in ("acc_norm", "acc")})
        scores[name] = {int(s["doc_id"]): float(s[metric]) for s in samples}
    return scores
