"""The CLI end to end on a tiny model in tmp_path: prune, resume after SIGKILL, extract, inspect, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import extract_args, prune_args
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from multipruner.cli import main
from multipruner.core.plan import PruningPlan


def _manifest(run):
    return json.loads((run / "run.json").read_text())


def test_prune_end_to_end_with_extract_then_bench_finds_the_dense_model(
    tiny_model_dir, calibration_txt, tmp_path, capsys
):
    run = tmp_path / "run"
    assert main(prune_args(tiny_model_dir, run, calibration_txt, "--extract")) == 0
    out = capsys.readouterr().out
    # kl-block (the default objective) scores block steps by KL to the dense model, width steps by NLL
    assert "pruning ratio" in out and "exp(KL to the dense model), block set" in out
    assert "calibration perplexity, width set" in out
    for name in ("run.json", "calibration.safetensors", "steps.jsonl", "plan.json", "pruning_config.json"):
        assert (run / name).is_file(), name
    manifest = _manifest(run)
    assert manifest["format"] == "multipruner-run/2"
    assert set(manifest["phases"]) == {"search", "extract", "report"}
    assert manifest["source"] == {"spec": str(tiny_model_dir), "path": str(tiny_model_dir.resolve())}
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert steps[0]["stage"] == "dense"
    assert {s["stage"] for s in steps[1:]} == {"block", "mlp_width", "attn_width"}
    assert all(s["plan"]["format"] == "multipruner-plan/1" for s in steps[1:])  # our plan, not the lossy one
    plan = json.loads((run / "plan.json").read_text())
    assert plan["params"]["ratio"] >= 30.0
    model = AutoModelForCausalLM.from_pretrained(run / "model", trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) == plan["params"]["pruned"]
    assert PruningPlan.from_dict(plan).to_reference() == json.loads((run / "pruning_config.json").read_text())
    # the bug this pins: bench found the dense model only for `multipruner extract` outputs
    bench_args = [
        "bench",
        "--model",
        str(run / "model"),
        "--seqlen",
        "8",
        "--new-tokens",
        "2",
        "--repeats",
        "1",
        "--device",
        "cpu",  # every command that runs a model takes --device (issue 12)
    ]
    assert main([*bench_args, "--output", str(run / "bench.json")]) == 0
    bench = json.loads((run / "bench.json").read_text())
    assert bench["models"]["dense"]["params"] == plan["params"]["dense"]
    assert bench["models"]["pruned"]["params"] == plan["params"]["pruned"]


def test_prune_do_eval_writes_typed_results_and_no_fake_report_row(
    tiny_model_dir, calibration_txt, tmp_path, capsys
):
    from multipruner.evaluation.results import EvalResult

    run = tmp_path / "run"
    eval_flags = [
        "--do_eval",
        "--eval-tasks",
        f"{calibration_txt},piqa",
        "--eval-limit",
        "2",
        "--eval-seqlen",
        "16",
    ]
    assert main(prune_args(tiny_model_dir, run, calibration_txt, "--max-steps", "2", *eval_flags)) == 0
    dense, pruned = (EvalResult.read(run / f"eval_{name}.json") for name in ("dense", "pruned"))
    assert dense.meta.dense_params is None and dense.meta.ratio == 0
    assert pruned.meta.dense_params == dense.meta.params > pruned.meta.params and pruned.meta.ratio > 0
    assert pruned.meta.limit == 2
    assert set(pruned.tasks) == {"calib", "piqa"} and pruned.tasks["piqa"]["acc"].n == 2
    assert (run / "eval_pruned.csv").is_file()
    assert "calib ppl" in capsys.readouterr().out
    report = (run / "report.md").read_text()
    # the bug this pins: the flat result's "limit" key became an accuracy row
    assert "limit" not in report.lower().split("## figures")[0].split("dense vs pruned")[1]


def test_existing_run_needs_resume(tiny_model_dir, calibration_txt, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(prune_args(tiny_model_dir, run, calibration_txt, "--max-steps", "1")) == 0
    assert main(prune_args(tiny_model_dir, run, calibration_txt)) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(prune_args(tiny_model_dir, run, calibration_txt, "--resume", "--target_ratio", "20")) == 2
    assert "settings differ (target_ratio: 30.0 -> 20.0)" in capsys.readouterr().err


def test_resume_starts_a_new_run_but_not_in_a_foreign_directory(
    tiny_model_dir, calibration_txt, tmp_path, capsys
):
    """The main job always passes --resume: a fresh directory starts (its own lock file does not count)."""
    run = tmp_path / "fresh"
    assert main(prune_args(tiny_model_dir, run, calibration_txt, "--max-steps", "1", "--resume")) == 0
    assert (run / "run.json").is_file()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(prune_args(tiny_model_dir, foreign, calibration_txt, "--resume")) == 2
    assert "not a multipruner run" in capsys.readouterr().err


def _run_cli(args, env):
    return subprocess.run(
        [sys.executable, "-m", "multipruner.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize(
    "point", ["step_logged:3", "step_done:3", "candidate_scored:40", "calibration_built"]
)
def test_sigkill_at_a_recorded_point_then_resume_gives_identical_plan(
    tiny_model_dir, calibration_txt, tmp_path, point
):
    reference_run, killed_run = tmp_path / "uninterrupted", tmp_path / "killed"
    assert main(prune_args(tiny_model_dir, reference_run, calibration_txt)) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MULTIPRUNER_KILL_AT": point}
    proc = _run_cli(prune_args(tiny_model_dir, killed_run, calibration_txt), env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert "search" not in _manifest(killed_run).get("phases", {})
    assert main(prune_args(tiny_model_dir, killed_run, calibration_txt, "--resume")) == 0
    ref = json.loads((reference_run / "pruning_config.json").read_text())
    assert json.loads((killed_run / "pruning_config.json").read_text()) == ref
    choices = [
        [json.loads(x)["choice"] for x in (r / "steps.jsonl").read_text().splitlines()[1:]]
        for r in (reference_run, killed_run)
    ]
    assert choices[0] == choices[1]


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
    assert main(extract_args(tiny_model_dir, plan_path, out, "--weight-reorder")) == 0
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
        (["--mlp_channel_group_size", "96"], "leaves nothing of the width 96"),
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


def test_pruning_an_already_pruned_model_is_refused_clearly(
    tiny_model_dir, calibration_txt, tmp_path, capsys
):
    run = tmp_path / "run"
    assert main(prune_args(tiny_model_dir, run, calibration_txt, "--max-steps", "1", "--extract")) == 0
    again = tmp_path / "again"
    assert main(prune_args(run / "model", again, calibration_txt)) == 2
    err = capsys.readouterr().err
    assert "already pruned" in err and "Traceback" not in err
    assert not again.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["eval", "--model", "./no/such/model", "--tasks", "wikitext2"],
            "model path not found: ./no/such/model",
        ),
        (["prune", "--model", "smollm2-135m", "--distribution", "-1:1:1"], "three non-negative numbers"),
        (["prune", "--model", "smollm2-135m", "--target-ratio", "-5"], "target ratio must be in (0, 100)"),
    ],
)
def test_messages_name_the_real_problem(args, message, capsys):
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_output_that_is_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("mine")
    assert main(["prune", "--model", "smollm2-135m", "--output", str(out)]) == 2
    assert "is a file; it must be a directory" in capsys.readouterr().err
    assert out.read_text() == "mine"


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
    assert main(extract_args(tiny_model_dir, tmp_path / "missing.json", out)) == 2
    assert "plan file not found" in capsys.readouterr().err
    assert not out.exists()
    assert main(["inspect", "--model", str(tmp_path / "nowhere")]) == 2


def test_extract_recomputes_the_activation_order_a_reference_plan_lacks(
    tiny_model_dir, calibration_txt, tmp_path, capsys
):
    """An activation-ordered search's reference-format plan (which has no order) extracted with
    --activation-order and the search's calibration flags is the run's own model; with L1 order it is not."""
    run = tmp_path / "run"
    assert (
        main(
            prune_args(
                tiny_model_dir, run, calibration_txt, "--channel-importance", "activations", by_tokens=True
            )
        )
        == 0
    )
    stored = json.loads((run / "plan.json").read_text())
    assert stored["channel_order"] and any(w < 96 for w in stored["mlp_width"])  # a narrowed MLP to get right
    calibration = ["--calibration_dataset", str(calibration_txt), "--seqlen", "16"]
    calibration += ["--block-tokens", "64", "--width-tokens", "32"]
    reference = run / "pruning_config.json"
    outputs = {
        "run": extract_args(tiny_model_dir, run / "plan.json", tmp_path / "a"),
        "recomputed": extract_args(
            tiny_model_dir, reference, tmp_path / "b", "--weight-reorder", "--activation-order", *calibration
        ),
        "l1": extract_args(tiny_model_dir, reference, tmp_path / "c", "--weight-reorder"),
    }
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    logits = {}
    for name, args in outputs.items():
        assert main(args) == 0
        model = AutoModelForCausalLM.from_pretrained(args[args.index("--output") + 1], trust_remote_code=True)
        with torch.no_grad():
            logits[name] = model(ids).logits
    torch.testing.assert_close(logits["recomputed"], logits["run"], rtol=0, atol=1e-6)
    assert not torch.allclose(logits["l1"], logits["run"], atol=1e-3)
    saved = json.loads((tmp_path / "b" / "multipruner_plan.json").read_text())
    assert saved["channel_order"] == stored["channel_order"]  # the saved model records the order it used
    capsys.readouterr()
    assert main(extract_args(tiny_model_dir, run / "plan.json", tmp_path / "d", "--activation-order")) == 2
    assert "stores its channel order" in capsys.readouterr().err
    # checked before any model loads: a model that does not exist is not reached
    assert (
        main(extract_args(tmp_path / "nowhere", run / "plan.json", tmp_path / "d", "--activation-order")) == 2
    )
    assert "stores its channel order" in capsys.readouterr().err
