"""The run directory of a search: settings, calibration tokens, step log, plans; resumable after a kill.

Files (each written atomically, the step log appended with fsync):
  run.json                 settings and model identity; a resumed run must match them
  calibration.safetensors  the exact token ids of each calibration set
  steps.jsonl              one JSON object per finished step (step -1: the dense model)
  plan.json                our plan after the last finished step
  pruning_config.json      the same in the reference's format
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .io_utils import append_line_durably, atomic_write_text
from .layout import ModelLayout
from .plan import PruningPlan

log = logging.getLogger(__name__)

# settings that change the result; anything else (progress, device, eval flags) may differ on resume
RESUME_KEYS = (
    "model",
    "target_ratio",
    "distribution",
    "mlp_group_size",
    "attention_group_size",
    "weight_reorder",
    "calibration_dataset",
    "num_calibration_samples_block",
    "num_calibration_samples_width",
    "seqlen",
    "dtype",
    "seed",
    "batch_size",
)


class RunDirError(ValueError):
    """A run directory that cannot be started or resumed as asked."""


def read_steps(path: Path) -> list[dict]:
    """Finished steps; a torn last line (killed mid-write) is dropped."""
    if not path.is_file():
        return []
    records = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines) - 1:
                raise RunDirError(
                    f"{path} line {number + 1} is corrupt (not the last line, so not a torn write)"
                ) from None
            log.warning("dropping a torn last line of %s", path)
    return records


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.settings_file = self.path / "run.json"
        self.calibration_file = self.path / "calibration.safetensors"
        self.steps_file = self.path / "steps.jsonl"
        self.plan_file = self.path / "plan.json"
        self.reference_file = self.path / "pruning_config.json"

    def start(self, settings: dict, resume: bool) -> list[dict]:
        """Create or reopen the directory; returns the steps already done (only with ``resume``)."""
        if self.settings_file.is_file():
            if not resume:
                raise RunDirError(
                    f"{self.path} already holds a run; pass --resume to continue it, or choose another --output_path"
                )
            stored = json.loads(self.settings_file.read_text())
            changed = [k for k in RESUME_KEYS if stored.get(k) != settings.get(k)]
            if changed:
                diffs = ", ".join(f"{k}: {stored.get(k)!r} -> {settings.get(k)!r}" for k in changed)
                raise RunDirError(f"cannot resume {self.path}: settings differ ({diffs})")
            steps = [s for s in read_steps(self.steps_file) if s.get("step", -1) >= 0]
            log.info("resuming %s after %d finished steps", self.path, len(steps))
            return steps
        self.path.mkdir(parents=True, exist_ok=True)
        if self.steps_file.exists():
            self.steps_file.unlink()  # steps without settings: a run killed before it started
        atomic_write_text(self.settings_file, json.dumps(settings, indent=2) + "\n")
        return []

    def dense_record(self) -> dict | None:
        return next((s for s in read_steps(self.steps_file) if s.get("step") == -1), None)

    # calibration tokens are stored once so a resumed run scores on exactly the same data
    def load_calibration(self) -> dict[str, torch.Tensor] | None:
        return load_file(self.calibration_file) if self.calibration_file.is_file() else None

    def save_calibration(self, sets: dict[str, torch.Tensor]) -> None:
        tmp = self.calibration_file.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in sets.items()}, tmp)
        tmp.replace(self.calibration_file)

    def append_step(self, record: dict) -> None:
        append_line_durably(self.steps_file, json.dumps(record))

    def save_plan(self, plan: PruningPlan, layout: ModelLayout) -> None:
        plan.save(self.plan_file, layout)
        plan.save_reference(self.reference_file)
