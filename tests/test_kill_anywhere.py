"""Kill ``prune --extract`` with SIGKILL at every kind of place, resuming each time: the chain must end
with the plan and model of an uninterrupted run, and no kill may leave a directory that looks like a
finished model but is not one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import prune_args
from safetensors.torch import load_file

from multipruner.cli import main

# one kill per kind of place, in the order a run reaches them; each resumed process counts afresh
KILL_CHAIN = [
    "calibration_built",  # calibration drawn, not yet stored
    "candidate_scored:30",  # in the middle of a step
    "step_logged:2",  # a step record written, its plan not yet
    "step_done:2",  # right after a step is complete
    "weights_saved",  # extraction: weights written, tokenizer and plan not yet
    "model_written",  # extraction: everything written, not yet moved into place
]


def _looks_like_models(root: Path) -> list[Path]:
    """Visible directories holding a model config (what a user would try to load)."""
    return [
        p.parent
        for p in root.rglob("config.json")
        if not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]


def _resume(model, run, calib, kill_at: str | None) -> int:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MULTIPRUNER_KILL_AT", None)
    if kill_at:
        env["MULTIPRUNER_KILL_AT"] = kill_at
    argv = prune_args(model, run, calib, "--extract", "--resume")
    return subprocess.run(
        [sys.executable, "-m", "multipruner.cli", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ).returncode


@pytest.mark.slow
def test_killed_anywhere_then_resumed_equals_an_uninterrupted_run(tiny_model_dir, calibration_txt, tmp_path):
    reference = tmp_path / "uninterrupted"
    assert main(prune_args(tiny_model_dir, reference, calibration_txt, "--extract")) == 0
    run = tmp_path / "killed"
    for point in KILL_CHAIN:
        assert _resume(tiny_model_dir, run, calibration_txt, point) == -signal.SIGKILL, point
        # a model directory that exists is whole: the one the finished extraction would have written
        for found in _looks_like_models(run):
            assert found == run / "model" and (found / "multipruner_plan.json").is_file(), (point, found)
    assert _resume(tiny_model_dir, run, calibration_txt, None) == 0
    assert (run / "pruning_config.json").read_text() == (reference / "pruning_config.json").read_text()
    choices = [
        [json.loads(line)["choice"] for line in (r / "steps.jsonl").read_text().splitlines()[1:]]
        for r in (reference, run)
    ]
    assert choices[0] == choices[1]
    assert _looks_like_models(run) == [run / "model"]
    assert not [p.name for p in run.iterdir() if ".partial-" in p.name or p.name.endswith(".tmp")]
    ours, theirs = (
        load_file(run / "model" / "model.safetensors"),
        load_file(reference / "model" / "model.safetensors"),
    )
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
