"""LoRA recovery: it trains (loss falls), merges exactly, resumes after a kill, and refuses bad targets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import extract_args, rel_err

from multipruner.cli import main
from multipruner.core.adapters import adapter_for
from multipruner.core.checkpoint import load_pruned
from multipruner.repair.recover import (
    RecoverSettings,
    Recovery,
    RecoveryError,
    default_targets,
    training_tokens,
)


@pytest.fixture
def pruned_dir(tiny_model_dir, tmp_path):
    plan = {
        "pruned_attn_idx": [1],
        "pruned_mlp_idx": [2],
        "pruned_attn_width": {"0": 32},
        "pruned_mlp_width": {"3": 48},
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "pruned"
    assert main(extract_args(tiny_model_dir, tmp_path / "plan.json", out)) == 0
    return out


def _settings(calibration_txt, **kw) -> RecoverSettings:
    base = dict(
        data=str(calibration_txt),
        max_steps=12,
        batch_size=2,
        seqlen=16,
        lr=5e-3,
        warmup_steps=1,
        save_every=4,
    )
    return RecoverSettings(**{**base, **kw})


def test_recovery_lowers_the_loss_and_merges_exactly(pruned_dir, calibration_txt, tmp_path):
    model, tokenizer = load_pruned(pruned_dir)
    settings = _settings(calibration_txt, dropout=0.0)
    run = Recovery(model, tokenizer, settings, tmp_path / "out", progress=False)
    tokens = training_tokens(settings, tokenizer)
    with torch.no_grad():
        before = run.model(input_ids=tokens, labels=tokens).loss.item()
    state = run.train(tokens)
    with torch.no_grad():
        after = run.model(input_ids=tokens, labels=tokens).loss.item()
        adapted = run.model(input_ids=tokens[:2]).logits
    assert state.step == 12 and len(state.losses) == 12
    assert after < before  # the loss on the training text falls
    merged = run.merged()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        assert rel_err(merged(input_ids=tokens[:2]).logits, adapted) < 1e-5  # merged == base + adapter


def test_recover_command_saves_a_plain_model_and_keeps_the_adapter(
    pruned_dir, calibration_txt, tmp_path, capsys
):
    out = tmp_path / "recovered"
    args = ["recover", "--model", str(pruned_dir), "--output", str(out), "--data", str(calibration_txt)]
    assert main([*args, "--max-steps", "4", "--seqlen", "16", "--save-every", "2"]) == 0
    assert "recovered in 4 steps" in capsys.readouterr().out
    assert (out / "adapter" / "adapter_config.json").is_file() and not out.with_name(
        "recovered.checkpoints"
    ).exists()
    model, _ = load_pruned(out)  # no peft involved
    plain, _ = load_pruned(pruned_dir)
    recovered, before = dict(model.named_parameters()), dict(plain.named_parameters())
    assert recovered.keys() == before.keys()
    # the adapter, merged, changed exactly the weights of the linears LoRA targets, and nothing else
    targets = tuple(f"{name}.weight" for name in default_targets(adapter_for(plain)))
    changed = {name for name in before if not torch.equal(recovered[name], before[name])}
    targeted = {name for name in before if name.endswith(targets)}
    assert targeted and changed == targeted
    recovery = json.loads((out / "multipruner_plan.json").read_text())["meta"]["recovery"]
    assert recovery["steps"] == 4 and recovery["settings"]["r"] == 16
    assert main(args) == 2  # exists: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_killed_recovery_resumes_from_its_checkpoint(pruned_dir, calibration_txt, tmp_path):
    common = ["--data", str(calibration_txt), "--max-steps", "8", "--seqlen", "16", "--save-every", "3"]
    common += ["--dropout", "0", "--lr", "5e-3"]
    straight = tmp_path / "straight"
    assert main(["recover", "--model", str(pruned_dir), "--output", str(straight), *common]) == 0
    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MULTIPRUNER_KILL_AT": "recover_step:5"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "multipruner.cli",
            "-q",
            "recover",
            "--model",
            str(pruned_dir),
            "--output",
            str(killed),
            *common,
        ],
        env=env,
        capture_output=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-1500:]
    assert (tmp_path / "killed.checkpoints" / "step-3").is_dir() and not killed.exists()
    assert main(["recover", "--model", str(pruned_dir), "--output", str(killed), "--resume", *common]) == 0
    a = json.loads((straight / "multipruner_plan.json").read_text())["meta"]["recovery"]
    b = json.loads((killed / "multipruner_plan.json").read_text())["meta"]["recovery"]
    assert b["steps"] == 8 and b["last_loss"] == pytest.approx(a["last_loss"], rel=1e-4)
    ids = torch.tensor([[3, 4, 5, 6]])
    assert rel_err(load_pruned(killed)[0](ids).logits, load_pruned(straight)[0](ids).logits) < 1e-4


def test_bad_recovery_inputs(pruned_dir, calibration_txt, tmp_path, capsys):
    model, tokenizer = load_pruned(pruned_dir)
    with pytest.raises(RecoveryError, match=r"LoRA targets \['qkv_proj'\] are not linear modules"):
        Recovery(model, tokenizer, _settings(calibration_txt, targets=["qkv_proj"]), tmp_path / "o")
    with pytest.raises(RecoveryError, match="--lr must be positive"):
        _settings(calibration_txt, lr=0.0).validate()
    assert main(["recover", "--model", str(tmp_path), "--output", str(tmp_path / "x")]) == 2
    assert "not a pruned model directory" in capsys.readouterr().err


def test_prune_with_every_phase_evaluates_each_model_and_reports_them(
    tiny_model_dir, calibration_txt, tmp_path
):
    from test_cli import prune_args

    from multipruner.evaluation.results import EvalResult

    run = tmp_path / "run"
    phases = ["--compensate", "--recover", "--recover-max-steps", "3", "--recover-seqlen", "16"]
    phases += ["--recover-data", str(calibration_txt), "--do-eval", "--eval-tasks", str(calibration_txt)]
    assert main(prune_args(tiny_model_dir, run, calibration_txt, *phases, "--eval-seqlen", "16")) == 0
    manifest = json.loads((run / "run.json").read_text())
    assert {"search", "compensate", "extract", "recover", "evaluate", "report"} <= set(manifest["phases"])
    assert manifest["phases"]["recover"]["from"] == "compensated"
    ppl = {
        w: EvalResult.read(run / f"eval_{w}.json").tasks["calib"]["ppl"].value
        for w in ("dense", "pruned", "compensated", "recovered")
    }
    assert len(set(ppl.values())) == 4  # four different models were measured
    report = (run / "report.md").read_text()
    section = report.split("## Winning back quality", 1)[1].split("##", 1)[0]
    assert "| Metric | Dense | Pruned | Compensated | Recovered |" in section
    assert f"{ppl['compensated']:.2f}" in section and f"{ppl['recovered']:.2f}" in section
    # resuming does nothing twice
    mtimes = {p: p.stat().st_mtime for p in run.glob("eval_*.json")}
    assert (
        main(prune_args(tiny_model_dir, run, calibration_txt, *phases, "--eval-seqlen", "16", "--resume"))
        == 0
    )
    assert {p: p.stat().st_mtime for p in run.glob("eval_*.json")} == mtimes
