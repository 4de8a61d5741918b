"""Evaluation: perplexity against a straightforward computation; eval, bench and report end to end."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F

from multipruner.cli import main
from multipruner.evaluation.perplexity import stream_perplexity
from multipruner.evaluation.results import EvalResult


def test_stream_perplexity_matches_straightforward(tiny_model):
    torch.manual_seed(0)
    stream = torch.randint(0, tiny_model.config.vocab_size, (5 * 12 + 7,))  # 5 windows + a dropped tail
    got = stream_perplexity(tiny_model, stream, seqlen=12, batch_size=2, progress=False)
    window_means = []
    with torch.no_grad():
        for w in range(5):
            ids = stream[w * 12 : (w + 1) * 12][None]
            logits = tiny_model(ids).logits[0, :-1]
            window_means.append(F.cross_entropy(logits, ids[0, 1:]).item())
    assert got == pytest.approx(math.exp(sum(window_means) / 5), rel=1e-5)


def test_perplexity_rejects_short_text(tiny_llama):
    with pytest.raises(ValueError, match="fewer than one window"):
        stream_perplexity(tiny_llama, torch.arange(10), seqlen=16, progress=False)


def test_eval_cli_text_and_zero_shot(tiny_model_dir, calibration_txt, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--tasks",
                f"{calibration_txt},piqa",
                "--limit",
                "3",
                "--seqlen",
                "16",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    result = EvalResult.read(out)
    assert result.tasks["calib"]["ppl"].value > 1.0 and result.tasks["calib"]["ppl"].n > 0
    piqa = result.tasks["piqa"]["acc_norm"]
    assert 0.0 <= piqa.value <= 1.0 and piqa.n == 3 and piqa.stderr is not None
    row = next(csv.DictReader(out.with_suffix(".csv").open()))
    assert float(row["piqa"]) == round(100 * piqa.value, 2)
    assert int(row["total_params"]) == result.meta.params and float(row["ppl_calib"]) > 1.0
    assert main(["eval", "--model", str(tiny_model_dir), "--tasks", "no_such_task", "--limit", "3"]) != 0


def test_bench_and_report_cli(tiny_model_dir, calibration_txt, tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(
            [
                "prune",
                "--model",
                str(tiny_model_dir),
                "--output_path",
                str(run),
                "--target_ratio",
                "25",
                "--pruning_distribution",
                "50:50:0",
                "--mlp_channel_group_size",
                "24",
                "--attn_channel_group_size",
                "32",
                "--calibration_dataset",
                str(calibration_txt),
                "--num_calibration_samples_block",
                "16",
                "--num_calibration_samples_width",
                "8",
                "--seqlen",
                "16",
                "--extract",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "bench",
                "--model",
                str(run / "model"),
                "--dense",
                str(tiny_model_dir),
                "--seqlen",
                "16",
                "--new-tokens",
                "4",
                "--repeats",
                "1",
                "--output",
                str(run / "bench.json"),
            ]
        )
        == 0
    )
    bench = json.loads((run / "bench.json").read_text())
    models = bench["models"]
    assert models["pruned"]["params"] < models["dense"]["params"]
    assert bench["ratios"]["params_ratio"] == pytest.approx(
        models["pruned"]["params"] / models["dense"]["params"]
    )
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    # The removed blocks are those of the run's own plan, and the steps table has one row per record.
    plan = json.loads((run / "plan.json").read_text())
    removed_attention, removed_mlp = plan["removed_attention"], plan["removed_mlp"]
    assert removed_attention or removed_mlp, "half of a 25 % target goes to blocks: at least one is removed"
    assert (
        f"- **Removed blocks:** attention {removed_attention or 'none'}; MLP {removed_mlp or 'none'}\n"
        in report
    )
    records = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines() if line.strip()]
    searched = [r for r in records if r["step"] != -1]
    assert len(searched) >= 2 and len(records) == len(searched) + 1  # the dense record, then the steps
    table = report.split("## Search steps\n", 1)[1].split("## Settings")[0].splitlines()
    rows = [line.strip("|").split("|") for line in table if line.startswith("| ")][2:]  # past the header
    assert [(row[0].strip(), row[1].strip()) for row in rows] == [("dense", "—")] + [
        (str(r["step"]), r["stage"]) for r in searched
    ]
    assert rows[-1][4].strip() == f"{searched[-1]['ratio']:.2f}"
    # the settings section shows what run.json records, a new setting included with no report change
    settings = report.split("## Settings\n", 1)[1]
    assert (
        "| search | target_ratio | `25.0` |" in settings
        and "| search | distribution | `50:50:0` |" in settings
    )
    for png in ("trajectory.png", "structure.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
