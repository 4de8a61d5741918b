"""Running out of memory mid-search is a clear stop: one line naming the settings to lower, every finished
step kept, and ``--resume`` with a lowered setting ends at the uninterrupted run's plan."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import prune_args

from multipruner import faults
from multipruner.cli import main
from multipruner.out_of_memory import is_out_of_memory


def _choices(run) -> list[dict]:
    return [json.loads(line)["choice"] for line in (run / "steps.jsonl").read_text().splitlines()[1:]]


def test_an_allocation_failure_mid_step_stops_clearly_and_a_resume_with_less_memory_ends_at_the_same_plan(
    tiny_model_dir, calibration_txt, tmp_path, monkeypatch, capsys
):
    reference = tmp_path / "uninterrupted"
    assert main(prune_args(tiny_model_dir, reference, calibration_txt, "--no-report")) == 0
    run = tmp_path / "ran-out"
    faults.reset()
    monkeypatch.setenv(faults.OOM_ENV, "candidate_scored:150")  # in the middle of a later step
    capsys.readouterr()
    assert main(prune_args(tiny_model_dir, run, calibration_txt, "--no-report")) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("multipruner prune: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr
    err = errors[0]
    assert "out of memory in the search phase" in err and "--reuse-mb (now 2048)" in err
    assert "--resume" in err
    kept = _choices(run)
    assert 0 < len(kept) < len(_choices(reference))
    assert f"the {len(kept)} finished search steps" in err

    monkeypatch.delenv(faults.OOM_ENV)
    resumed = prune_args(tiny_model_dir, run, calibration_txt, "--no-report", "--resume", "--reuse-mb", "0")
    assert main(resumed) == 0
    assert _choices(run)[: len(kept)] == kept
    assert _choices(run) == _choices(reference)
    assert (run / "pruning_config.json").read_text() == (reference / "pruning_config.json").read_text()


@pytest.mark.parametrize(
    "err, expected",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (MemoryError(), True),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_what_counts_as_running_out_of_memory(err, expected):
    assert is_out_of_memory(err) is expected
