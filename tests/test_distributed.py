"""The search shared by processes launched with torchrun (gloo on CPU) chooses what one process chooses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import prune_args

from multipruner.cli import main

pytestmark = pytest.mark.slow  # each launch starts three Python processes that import torch


def _steps(run) -> list[dict]:
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_two_processes_choose_what_one_process_chooses(tiny_model_dir, calibration_txt, tmp_path, mode):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(prune_args(tiny_model_dir, one, calibration_txt, "--search", mode, "--extract")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args = prune_args(tiny_model_dir, two, calibration_txt, "--search", mode, "--extract")
    done = subprocess.run([*launch, "-m", "multipruner.cli", *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((two / "plan.json").read_text()) == json.loads((one / "plan.json").read_text())
    steps_one, steps_two = _steps(one), _steps(two)
    assert [s.get("choice") for s in steps_two] == [s.get("choice") for s in steps_one]
    for a, b in zip(steps_one, steps_two, strict=True):
        for ca, cb in zip(a.get("candidates", []), b.get("candidates", []), strict=True):
            assert (ca["ppl"] is None) == (cb["ppl"] is None)
            assert ca["ppl"] is None or abs(ca["ppl"] / cb["ppl"] - 1) < 1e-6
        assert a.get("skipped_batches") == b.get("skipped_batches")
        if "choice" in b:  # the work was shared (a candidate belongs to process layer % 2), not done twice
            ran = b["total_batches"] - b["skipped_batches"]
            assert sum(b["batches_by_process"]) == ran
            if {c["layer"] % 2 for c in b["candidates"] if c["ppl"] is not None} == {0, 1}:
                assert min(b["batches_by_process"]) > 0
    assert (two / "model" / "config.json").is_file()  # rank 0 went on to extract


def test_more_processes_than_layers_is_refused_before_any_waiting(
    tiny_model_dir, calibration_txt, tmp_path, monkeypatch, capsys
):
    # the tiny model has 4 layers; the check runs before the process group is joined, so no peers needed
    monkeypatch.setenv("WORLD_SIZE", "6")
    monkeypatch.setenv("RANK", "0")
    assert main(prune_args(tiny_model_dir, tmp_path / "run", calibration_txt)) == 2
    err = capsys.readouterr().err
    assert "torchrun started 6 processes but the model has 4 layers" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_every_process_sizes_the_head_bound_by_the_busiest_share(rank):
    """Whether a step bounds heads must not depend on the rank (the processes would stop agreeing)."""
    from multipruner.search.distributed import Workers

    workers = Workers(rank=rank, size=2)
    layers = [0, 0, 2, 4, 1]  # process 0 owns four of these candidates, process 1 one
    assert workers.largest_share(layers) == 4
    assert sum(workers.owns(layer) for layer in layers) == (4 if rank == 0 else 1)
    assert workers.largest_share([]) == 0
