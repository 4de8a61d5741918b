"""The CLI end to end on a tiny model in tmp_path: prune, resume after SIGKILL, extract, inspect, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from multipruner.cli import main
from multipruner.plan import PruningPlan


def prune_args(model_dir, run_dir, calib, *extra):
    return [
        "prune",
        "--model_path",
        str(model_dir),
        "--output_path",
        str(run_dir),
        "--weight_reorder",
        "--target_ratio",
        "30",
        "--pruning_distribution",
        "40:40:20",
        "--mlp_channel_group_size",
        "24",
        "--attn_channel_group_size",
        "32",
        "--calibration_dataset",
        str(calib),
        "--num_calibration_samples_block",
        "16",
        "--num_calibration_samples_width",
        "8",
        "--seqlen",
        "16",
        *extra,
    ]


def test_prune_end_to_end_with_extract(tiny_model_dir, calibration_txt, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(prune_args(tiny_model_dir, run, calibration_txt, "--extract")) == 0
    out = capsys.readouterr().out
    assert "pruning ratio" in out and "calibration ppl" in out
    for name in (
        "run.json",
        "calibration.safetensors",
        "steps.jsonl",
        "plan.json",
        "pruning_config.json",
        "summary.json",
    ):
        assert (run / name).is_file(), name
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert steps[0]["stage"] == "dense"
    assert {s["stage"] for s in steps[1:]} == {"block", "mlp_width", "attn_width"}
    assert all(len(s["candidates"]) > 0 and "ppl" in s["choice"] for s in steps[1:])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ratio"] >= 30.0
    model = AutoModelForCausalLM.from_pretrained(run / "model", trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) == summary["pruned_params"]
    assert json.loads((run / "pruning_config.json").read_text()) == summary["plan"]


def test_prune_do_eval_writes_dense_and_pruned_results(tiny_model_dir, calibration_txt, tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(
            prune_args(
                tiny_model_dir,
                run,
                calibration_txt,
                "--max-steps",
                "2",
                "--do_eval",
                "--eval-tasks",
                f"{calibration_txt},piqa",
                "--eval-limit",
                "2",
                "--eval-seqlen",
                "16",
            )
        )
        == 0
    )
    dense, pruned = (json.loads((run / f"eval_{name}.json").read_text()) for name in ("dense", "pruned"))
    assert dense["pruned_model_params"] == dense["total_params"] == pruned["total_params"]
    assert pruned["pruned_model_params"] < dense["pruned_model_params"]
    assert pruned["ratio"] > 0 and dense["ratio"] == 0
    assert {"ppl_calib", "piqa"} <= set(pruned) and (run / "eval_pruned.csv").is_file()
    assert "ppl_calib" in capsys.readouterr().out


def test_existing_run_needs_resume(tiny_model_dir, calibration_txt, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(prune_args(tiny_model_dir, run, calibration_txt, "--max-steps", "1")) == 0
    assert main(prune_args(tiny_model_dir, run, calibration_txt)) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(prune_args(tiny_model_dir, run, calibration_txt, "--resume", "--target_ratio", "20")) == 2
    assert "settings differ" in capsys.readouterr().err


def _run_cli(args, env):
    return subprocess.Popen(
        [sys.executable, "-m", "multipruner.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_sigkill_then_resume_gives_identical_plan(tiny_model_dir, calibration_txt, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    reference_run, killed_run = tmp_path / "uninterrupted", tmp_path / "killed"
    assert main(prune_args(tiny_model_dir, reference_run, calibration_txt)) == 0
    steps_file = killed_run / "steps.jsonl"
    proc = _run_cli(prune_args(tiny_model_dir, killed_run, calibration_txt), env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        # kill in the middle of the MLP stage: a dense line + a few finished steps on disk
        if steps_file.is_file() and len(steps_file.read_text().splitlines()) >= 4:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed_run / "summary.json").exists()
    assert main(prune_args(tiny_model_dir, killed_run, calibration_txt, "--resume")) == 0
    ref = json.loads((reference_run / "pruning_config.json").read_text())
    assert json.loads((killed_run / "pruning_config.json").read_text()) == ref
    ref_steps = [
        json.loads(x)["choice"] for x in (reference_run / "steps.jsonl").read_text().splitlines()[1:]
    ]
    got_steps = [json.loads(x)["choice"] for x in steps_file.read_text().splitlines()[1:]]
    assert got_steps == ref_steps


def test_extract_and_inspect_reference_plan(tiny_model_dir, tmp_path, capsys):
    plan = {
        "pruned_attn_idx": [1],
        "pruned_mlp_idx": [2],
        "pruned_attn_width": {"0": 32},
        "pruned_mlp_width": {"3": 48},
    }
    plan_path = tmp_path / "pruning_config.json"
    plan_path.write_text(json.dumps(plan))
    out = tmp_path / "pruned"
    assert (
        main(
            [
                "extract",
                "--model",
                str(tiny_model_dir),
                "--plan",
                str(plan_path),
                "--output",
                str(out),
                "--weight-reorder",
            ]
        )
        == 0
    )
    assert "REMOVED" in capsys.readouterr().out
    assert main(["inspect", "--model", str(out)]) == 0
    table = capsys.readouterr().out
    rows = {int(line.split()[0]): line.split() for line in table.splitlines() if line.split()[0].isdigit()}
    assert rows[0][2] == "4/1" and rows[1][1] == "REMOVED" and rows[2][3] == "REMOVED" and rows[3][4] == "48"
    saved = PruningPlan.from_dict(json.loads((out / "multipruner_plan.json").read_text()))
    assert saved.removed_attention == {1} and saved.weight_reorder
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    # the config keeps the family's model_type: stock AutoConfig/AutoTokenizer need no remote code
    assert AutoConfig.from_pretrained(out).pruned_structure["layers"][1]["attention"] is None
    assert AutoTokenizer.from_pretrained(out)("quick fox").input_ids
    with pytest.raises(RuntimeError, match="mismatched"):  # without our code: loud, never silently wrong
        AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape == (1, 9)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--target_ratio", "0"], "target ratio"),
        (["--target_ratio", "100"], "target ratio"),
        (["--mlp_channel_group_size", "40"], "divide the MLP width"),
        (["--attn_channel_group_size", "16"], "whole KV groups"),
        (["--seqlen", "4096"], "longer than the model's context"),
    ],
)
def test_bad_prune_inputs_fail_before_writing(
    tiny_model_dir, calibration_txt, tmp_path, capsys, extra, message
):
    run = tmp_path / "run"
    assert main(prune_args(tiny_model_dir, run, calibration_txt, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()


def test_bad_distribution_and_empty_calibration(tiny_model_dir, calibration_txt, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(prune_args(tiny_model_dir, tmp_path / "r", calibration_txt, "--pruning_distribution", "1:2"))
    assert "three non-negative numbers" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(prune_args(tiny_model_dir, tmp_path / "r2", empty)) == 2
    assert "empty" in capsys.readouterr().err.lower()
    assert not (tmp_path / "r2").exists()


def test_extract_errors(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "pruned_attn_idx": [],
                "pruned_mlp_idx": [],
                "pruned_attn_width": {"0": 24},
                "pruned_mlp_width": {},
            }
        )
    )
    out = tmp_path / "o"
    assert main(["extract", "--model", str(tiny_model_dir), "--plan", str(bad), "--output", str(out)]) == 2
    assert "whole KV groups" in capsys.readouterr().err
    assert (
        main(
            [
                "extract",
                "--model",
                str(tiny_model_dir),
                "--plan",
                str(tmp_path / "missing.json"),
                "--output",
                str(out),
            ]
        )
        == 2
    )
    assert "plan file not found" in capsys.readouterr().err
    assert not out.exists()
    assert main(["inspect", "--model", str(tmp_path / "nowhere")]) == 2
