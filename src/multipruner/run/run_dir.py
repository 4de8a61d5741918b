"""The run directory of ``multipruner prune``: every file of a run, each read and written here only.

Files (each written atomically; the step log appended with fsync):
  run.json                 RunManifest: format, source model, settings per phase, finished phases
  calibration.safetensors  the exact token ids of each calibration set
  steps.jsonl              the dense record (step -1), then one StepRecord per finished search step
  plan.json                the plan after the last finished step (PruningPlan, with the model's layout)
  pruning_config.json      the same plan in the reference's format (an export; never read back)
  model/                   the extracted pruned model
  model-compensated/       the same after closed-form compensation (prune --compensate)
  model-recovered/         after LoRA recovery (prune --recover)
  eval_<model>.json        EvalResult of the dense model and of each stage above (a CSV beside each)
  bench.json               speed comparison written by ``multipruner bench --output``
  report.md, *.png         the report
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..core.layout import ModelLayout
from ..core.plan import PlanError, PruningPlan
from ..errors import UsageError
from ..io_utils import append_line_durably, atomic_write_text, follow_umask, remove_stale_temporaries
from ..model_sources import ModelSource
from ..search.latency import LatencyTable
from ..settings import differences, to_dict, unrecorded_values

log = logging.getLogger(__name__)

RUN_FORMAT = "multipruner-run/2"
# the models a run can hold, in the order they are made; each has its directory and its evaluation file
MODEL_STAGES = ("pruned", "compensated", "recovered")
STAGE_DIRS = {"pruned": "model", "compensated": "model-compensated", "recovered": "model-recovered"}


class RunDirError(UsageError):
    """A run directory that cannot be started, resumed or read as asked."""


@dataclass
class RunManifest:
    """``run.json``: what the run is (source, settings per phase) and which phases are finished."""

    source: ModelSource
    settings: dict[str, dict]  # phase or group name -> settings.to_dict(...)
    phases: dict[str, dict] = field(default_factory=dict)  # finished phase -> {"wall_s": ...}

    def to_dict(self) -> dict:
        return {
            "format": RUN_FORMAT,
            "source": self.source.to_dict(),
            "settings": self.settings,
            "phases": self.phases,
        }

    @classmethod
    def from_dict(cls, data: dict, where: Path) -> RunManifest:
        if "format" not in data:  # one flat dict of settings: written before format 2
            raise RunDirError(
                f"{where} is from a multipruner older than {RUN_FORMAT}, which this one cannot resume or "
                "report: rerun the prune without --resume into a new directory"
            )
        if data["format"] != RUN_FORMAT:
            raise RunDirError(
                f"{where} has run format {data['format']!r}; this multipruner reads {RUN_FORMAT!r}"
            )
        try:
            return cls(ModelSource.from_dict(data["source"]), data["settings"], data.get("phases", {}))
        except (KeyError, TypeError) as err:
            raise RunDirError(f"{where} is not a valid run manifest ({err!r})") from err


@dataclass(frozen=True)
class DenseRecord:
    """Step -1 of the log: the dense model's calibration perplexity on each set."""

    ppl: float  # block set
    ppl_width: float | None
    params: int
    elapsed_s: float = 0.0

    def to_dict(self) -> dict:
        return {"step": -1, "stage": "dense", "ratio": 0.0, **self.__dict__}

    @classmethod
    def from_dict(cls, data: dict) -> DenseRecord:
        return cls(
            float(data["ppl"]), data.get("ppl_width"), int(data.get("params", 0)), data.get("elapsed_s", 0.0)
        )


def _as_run(cls, stored: dict | None) -> dict:
    """A group's settings as the stored run had them: a field it does not record (it predates the field)
    had the behaviour of its ``until_recorded`` value, else of its default."""
    return {**to_dict(cls()), **unrecorded_values(cls), **(stored or {})}


def _is_dense(record: dict) -> bool:
    return record.get("step") == -1 or record.get("stage") == "dense"


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest_file = self.path / "run.json"
        self.calibration_file = self.path / "calibration.safetensors"
        self.steps_file = self.path / "steps.jsonl"
        self.plan_file = self.path / "plan.json"
        self.reference_file = self.path / "pruning_config.json"
        self.model_dir = self.path / "model"
        self.bench_file = self.path / "bench.json"
        self.latency_file = self.path / "latency_table.json"
        self.lock_file = self.path / ".lock"
        self._lock_handle = None

    # --- the manifest ---------------------------------------------------------------------
    def exists(self) -> bool:
        return self.manifest_file.is_file()

    def holds_other_files(self) -> bool:
        """Whether the directory holds anything besides our own lock (someone else's files)."""
        return self.path.is_dir() and any(p != self.lock_file for p in self.path.iterdir())

    def manifest(self) -> RunManifest:
        if not self.exists():
            raise RunDirError(f"{self.path} is not a multipruner run directory (no run.json)")
        try:
            data = json.loads(self.manifest_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise RunDirError(f"cannot read {self.manifest_file}: {err}") from err
        return RunManifest.from_dict(data, self.manifest_file)

    def write_manifest(self, manifest: RunManifest) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.manifest_file, json.dumps(manifest.to_dict(), indent=2) + "\n")

    def check_start(self, resume: bool) -> None:
        """Refuse to start over a run without --resume, to resume a directory that holds no run, or to
        resume a run this version cannot read."""
        if not self.exists():
            if resume and self.holds_other_files():
                raise RunDirError(
                    f"--resume: {self.path} is not a multipruner run (no run.json); choose the run's directory"
                )
            return
        if not resume:
            raise RunDirError(
                f"{self.path} already holds a run; pass --resume to continue it, or choose another output"
            )
        self.manifest()

    def start_or_resume(self, resume: bool, source: ModelSource, settings: Mapping[str, Any]) -> None:
        """Write run.json for a new run, or check a resumed run's settings against the stored ones.

        ``settings``: group name -> settings dataclass, for the groups that decide the plan; a resumed run
        must keep their result-changing fields. Called with the directory locked: the check is final.
        """
        self.check_start(resume)
        if not self.exists():
            self.reset_steps()  # steps without a manifest: a run killed before it started
            self.write_manifest(RunManifest(source, {name: to_dict(s) for name, s in settings.items()}))
            return
        stored = self.manifest().settings
        changed = [
            difference
            for name, current in settings.items()
            for difference in differences(type(current), _as_run(type(current), stored.get(name)), current)
        ]
        if changed:
            raise RunDirError(f"cannot resume {self.path}: settings differ ({'; '.join(changed)})")

    def mark_done(self, phase: str, **facts) -> None:
        manifest = self.manifest()
        manifest.phases[phase] = facts
        self.write_manifest(manifest)

    # --- exclusive use -------------------------------------------------------------------
    def lock(self) -> None:
        """Take the directory for this process (released when it exits); refuse if another holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.lock_file, "a+")  # noqa: SIM115 - held for the life of the process
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirError(
                f"{self.path} is in use by {holder}; wait for it to finish or stop it, then --resume"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        self._lock_handle = handle
        remove_stale_temporaries(self.path)

    # --- calibration tokens: stored once so a resumed run scores on exactly the same data ----
    def load_calibration(self) -> dict[str, torch.Tensor] | None:
        if not self.calibration_file.is_file():
            return None
        try:
            return load_file(self.calibration_file)
        except (SafetensorError, OSError) as err:
            raise RunDirError(
                f"{self.calibration_file} is damaged ({err}); delete it and resume to rebuild it from the "
                "recorded settings"
            ) from err

    def save_calibration(self, sets: dict[str, torch.Tensor]) -> None:
        tmp = self.calibration_file.with_name(f".{self.calibration_file.name}.tmp")
        save_file({k: v.contiguous() for k, v in sets.items()}, tmp)
        follow_umask(tmp)
        tmp.replace(self.calibration_file)

    # --- the step log ---------------------------------------------------------------------
    def _records(self, repair: bool = False) -> list[dict]:
        """Every record; a torn last line (a kill mid-write) is dropped, and cut from the file if ``repair``."""
        if not self.steps_file.is_file():
            return []
        raw = self.steps_file.read_bytes()
        lines = raw.split(b"\n")
        records, good_bytes = [], 0
        for number, line in enumerate(lines):
            if not line.strip():
                good_bytes += len(line) + 1
                continue
            try:
                records.append(json.loads(line))
                good_bytes += len(line) + 1
            except json.JSONDecodeError:
                if any(rest.strip() for rest in lines[number + 1 :]):
                    raise RunDirError(
                        f"{self.steps_file} line {number + 1} is corrupt (not the last line, so not a torn "
                        "write); restore it or start a new run"
                    ) from None
                log.warning("dropping a torn last line of %s", self.steps_file)
                if repair:
                    with open(self.steps_file, "r+b") as handle:
                        handle.truncate(min(good_bytes, len(raw)))
                break
        return records

    def dense_record(self) -> DenseRecord | None:
        record = next((r for r in self._records() if _is_dense(r)), None)
        return None if record is None else DenseRecord.from_dict(record)

    def step_records(self) -> list[dict]:
        """Finished search steps as stored (``search.StepRecord.from_dict`` reads one)."""
        return [r for r in self._records() if not _is_dense(r)]

    def append_record(self, record: dict) -> None:
        self._records(repair=True)  # never append after a torn line
        append_line_durably(self.steps_file, json.dumps(record))

    def reset_steps(self) -> None:
        self.steps_file.unlink(missing_ok=True)

    # --- plan --------------------------------------------------------------------------------
    def latency_table(self) -> LatencyTable | None:
        """The latency table timed for this run's budget, or None before it is timed."""
        if not self.latency_file.is_file():
            return None
        try:
            return LatencyTable.from_dict(json.loads(self.latency_file.read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise RunDirError(
                f"cannot read {self.latency_file} ({err!r}); delete it to time the model again"
            ) from err

    def save_latency_table(self, table: LatencyTable) -> None:
        atomic_write_text(self.latency_file, json.dumps(table.to_dict(), indent=2) + "\n")

    def save_plan(self, plan: PruningPlan, layout: ModelLayout) -> None:
        plan.save(self.plan_file, layout)
        plan.save_reference(self.reference_file)

    def plan(self) -> tuple[PruningPlan, ModelLayout | None] | None:
        """The stored plan with the layout it was made for, or None if there is none yet."""
        if not self.plan_file.is_file():
            return None
        try:
            data = json.loads(self.plan_file.read_text())
            layout = ModelLayout.from_dict(data["layout"]) if "layout" in data else None
            return PruningPlan.from_dict(data, layout), layout
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise RunDirError(f"cannot read {self.plan_file}: {err!r}") from err
        except PlanError as err:
            raise RunDirError(f"{self.plan_file}: {err}") from err

    # --- evaluation and speed -----------------------------------------------------------------
    def eval_file(self, which: str) -> Path:
        """``which``: "dense" or a stage."""
        if which != "dense" and which not in MODEL_STAGES:
            raise ValueError(f"internal: no evaluation file for {which!r}")
        return self.path / f"eval_{which}.json"

    def stage_dir(self, stage: str) -> Path:
        return self.path / STAGE_DIRS[stage]
