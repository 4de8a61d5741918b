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
    result = json.loads(out.read_text())
    assert result["ppl_calib"] > 1.0 and 0.0 <= result["piqa"] <= 100.0
    assert result["details"]["tasks"]["piqa"]["n"] == 3
    row = next(csv.DictReader(out.with_suffix(".csv").open()))
    assert float(row["piqa"]) == result["piqa"] and int(row["total_params"]) == result["total_params"]
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
    assert "mlp_width" in report or "MLP" in report
    for png in ("trajectory.png", "structure.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
