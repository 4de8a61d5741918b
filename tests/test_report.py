"""The run report, from run directories built with the run's own writers, and from a run on a tiny model."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from PIL import Image

from multipruner.core.layout import ModelLayout
from multipruner.core.plan import PruningPlan
from multipruner.evaluation.results import EvalMeta, EvalResult, Metric
from multipruner.evaluation.speed import SpeedResult
from multipruner.evaluation.speed_comparison import compare_speed
from multipruner.report import load_run, write_report
from multipruner.report.figures import plot_comparison, plot_structure, plot_trajectory
from multipruner.run.run_dir import DenseRecord, ModelSource, RunDirectory, RunDirError, RunManifest
from multipruner.search.loop import StepRecord
from multipruner.search.stages import Candidate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS, HEADS, HEAD_DIM, MLP = 8, 9, 64, 1536
LAYOUT = ModelLayout(
    model_type="llama",
    num_layers=LAYERS,
    hidden_size=576,
    mlp_width=MLP,
    num_heads=HEADS,
    num_kv_heads=3,
    head_dim=HEAD_DIM,
    non_layer_params=49152 * 576 + 576,
    attention_fixed_params=576,
    mlp_fixed_params=576,
    q_bias=False,
    kv_bias=False,
    o_bias=False,
    mlp_in_bias=False,
    mlp_out_bias=False,
    num_mlp_in_projs=2,
)
# A plausible search: two block removals, two MLP shrinks, one attention shrink.
CHOICES = [
    ("block", Candidate("attention", "remove", 5)),
    ("block", Candidate("mlp", "remove", 6)),
    ("mlp_width", Candidate("mlp", "shrink", 2, 1280)),
    ("mlp_width", Candidate("mlp", "shrink", 3, 1024)),
    ("attn_width", Candidate("attention", "shrink", 1, 6 * HEAD_DIM)),
]
CHOICE_TEXTS = [
    "remove attention L5",
    "remove mlp L6",
    "shrink mlp L2 → 1280",
    "shrink mlp L3 → 1024",
    "shrink attention L1 → 384 (6 heads)",
]
DENSE = DenseRecord(ppl=18.2, ppl_width=17.0, params=LAYOUT.dense_params(), elapsed_s=12.0)


def _steps(reference_plans: bool = False) -> tuple[list[StepRecord], PruningPlan]:
    plan, steps, ppl = PruningPlan.dense(LAYOUT), [], 18.2
    for n, (stage, candidate) in enumerate(CHOICES):
        plan = candidate.apply(plan)
        ppl *= 1.15
        choice = {**candidate.to_dict(), "ppl": ppl}
        rival = {**Candidate(candidate.kind, candidate.op, candidate.layer + 1, candidate.width).to_dict()}
        steps.append(
            StepRecord(
                step=n,
                stage=stage,
                candidates=[choice, {**rival, "ppl": None}],  # the rival was eliminated by racing
                choice=choice,
                ppl=ppl,
                ratio=plan.ratio(LAYOUT),
                params=plan.num_params(LAYOUT),
                elapsed_s=30.0,
                plan=plan.to_reference() if reference_plans else plan.to_dict(),
                skipped_batches=0 if reference_plans else 3,
                total_batches=0 if reference_plans else 8,
                bounded_batches=0 if reference_plans else 4,
            )
        )
    return steps, plan


def _eval(params: int, ppl: float, piqa: tuple[float, float], boolq: float, limit=None) -> EvalResult:
    meta = EvalMeta(
        model="m",
        params=params,
        dense_params=None if params == LAYOUT.dense_params() else LAYOUT.dense_params(),
        limit=limit,
        seqlen=2048,
    )
    tasks = {
        "wikitext2": {"ppl": Metric(ppl, None, 140)},
        "piqa": {"acc": Metric(piqa[0], 0.0114, 1838), "acc_norm": Metric(piqa[1], 0.0109, 1838)},
        "boolq": {"acc": Metric(boolq, 0.0086, 3270)},
    }
    return EvalResult(meta, tasks)


def _bench() -> dict:
    common = {"batch_size": 1, "seqlen": 512, "new_tokens": 64, "memory_method": "weights+kv_cache"}
    dense = SpeedResult(LAYOUT.dense_params(), 2000.0, 40.0, 520.0, 540.0, **common)
    pruned = SpeedResult(51_000_000, 2400.0, 50.0, 460.0, 480.0, **common)
    return compare_speed({"dense": dense, "pruned": pruned})


def _write_typed_run(path: Path, final_ppl: dict | None = None) -> tuple[list[StepRecord], PruningPlan]:
    run = RunDirectory(path)
    phases = {"search": {"final_ppl": final_ppl, "steps": 5}} if final_ppl else {}
    run.write_manifest(RunManifest(ModelSource("smollm2-135m"), {"search": {"target_ratio": 10}}, phases))
    run.append_record(DENSE.to_dict())
    steps, plan = _steps()
    for step in steps:
        run.append_record(step.to_dict())
    plan.save(run.plan_file, LAYOUT)
    return steps, plan


def _write_evals(path: Path, plan: PruningPlan, limit=None) -> None:
    run = RunDirectory(path)
    _eval(LAYOUT.dense_params(), 20.5, (0.66, 0.681), 0.60, limit).write(run.eval_file("dense"))
    _eval(plan.num_params(LAYOUT), 27.25, (0.62, 0.642), 0.63, limit).write(run.eval_file("pruned"))


def _rows(text: str, section: str) -> list[list[str]]:
    """Body rows of the first table after ``## section``, as stripped cells."""
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in body.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as image:
        image.load()
        assert image.size[0] > 100 and image.size[1] > 100, (path, image.size)


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def test_full_report_from_typed_run(tmp_path):
    _, plan = _write_typed_run(tmp_path, final_ppl={"block": 40.0, "width": 35.5})
    _write_evals(tmp_path, plan)
    (tmp_path / "bench.json").write_text(json.dumps(_bench()))
    report = write_report(tmp_path)
    assert report == tmp_path / "report.md"
    text = report.read_text()
    for png in ("trajectory.png", "structure.png", "comparison.png"):
        _assert_png(tmp_path / png)
        assert f"]({png})" in text
    assert "- **Removed blocks:** attention [5]; MLP [6]\n" in text
    assert "- **Model:** `smollm2-135m`" in text
    assert f"**Pruning ratio reached:** {plan.ratio(LAYOUT):.2f} %" in text
    assert "**Search steps:** 5 (block 2, mlp_width 2, attn_width 1)" in text
    assert "**Search wall time:** 2m 42s" in text  # dense 12 s + 5 steps x 30 s
    assert (
        "**Racing:** 15 of 40 candidate-batches skipped (37.5 %); 20 more ran without their full LM head"
        in text
    )
    assert "block set:** 18.200 (dense) → 40.000 (final)" in text  # final ppl from the manifest
    assert "width set:** 17.000 (dense) → 35.500 (final)" in text

    rows = {row[0]: row[1:] for row in _rows(text, "Dense vs pruned")}
    dense_n, pruned_n = LAYOUT.dense_params(), plan.num_params(LAYOUT)
    assert rows["Parameters"] == [_params(dense_n), _params(pruned_n), f"{pruned_n / dense_n:.3f}×"]
    assert rows["WikiText-2 perplexity"] == ["20.50", "27.25", "1.329×"]
    assert rows["PIQA acc_norm (%)"] == ["68.10 ± 1.09", "64.20 ± 1.09", "-3.90 pt"]
    assert rows["BoolQ acc (%)"] == ["60.00 ± 0.86", "63.00 ± 0.86", "+3.00 pt"]
    mean_err = 100 * math.sqrt(0.0109**2 + 0.0086**2) / 2
    assert rows["Mean of 2 tasks (PIQA, BoolQ) (%)"] == [
        f"64.05 ± {mean_err:.2f}",
        f"63.60 ± {mean_err:.2f}",
        "-0.45 pt",
    ]
    assert rows["Prefill tokens/s"] == ["2000.0", "2400.0", "1.200×"]
    assert rows["Disk size (MB)"] == ["540.0", "480.0", "0.889×"]

    steps = _rows(text, "Search steps")
    assert [row[0] for row in steps] == ["dense", "0", "1", "2", "3", "4"]
    assert [row[2] for row in steps[1:]] == CHOICE_TEXTS
    assert steps[0][1:4] == ["—", "—", "18.200"]
    assert steps[-1][4] == f"{plan.ratio(LAYOUT):.2f}"
    assert not list(tmp_path.glob(".*.tmp")), "no temp files left behind"


def test_eval_limit_is_not_a_task_row(tmp_path):
    """--eval-limit 2 once showed up as a fake "limit acc (%)" row."""
    _, plan = _write_typed_run(tmp_path)
    run = RunDirectory(tmp_path)
    for which, acc in (("dense", 0.5), ("pruned", 1.0)):
        meta = EvalMeta(params=plan.num_params(LAYOUT), dense_params=LAYOUT.dense_params(), limit=2)
        tasks = {"piqa": {"acc": Metric(acc, 0.5, 2)}, "boolq": {"acc": Metric(0.5, 0.5, 2)}}
        EvalResult(meta, tasks).write(run.eval_file(which))
    text = write_report(tmp_path).read_text()
    rows = [row[0] for row in _rows(text, "Dense vs pruned")]
    assert not [label for label in rows if "limit" in label.lower()], rows
    assert [label for label in rows if label.startswith(("PIQA", "BoolQ"))] == [
        "PIQA acc (%)",
        "BoolQ acc (%)",
    ]
    assert "first 2 examples of each task" in text  # the limit is said once, outside the table


def test_steps_only_run_shows_dashes(tmp_path):
    run = RunDirectory(tmp_path / "run")
    steps, _ = _steps()
    for step in steps:
        run.append_record(step.to_dict())
    out = tmp_path / "out"
    report = write_report(run.path, out_dir=out)
    assert report == out / "report.md"
    text = report.read_text()
    _assert_png(out / "trajectory.png")
    assert not (out / "structure.png").exists(), "no layout: the structure cannot be drawn"
    assert not (out / "comparison.png").exists() and "comparison.png" not in text
    assert not (run.path / "report.md").exists()
    rows = {row[0]: row[1:] for row in _rows(text, "Dense vs pruned")}
    assert rows == {
        "Parameters": ["—", _params(steps[-1].params), "—"],  # no dense count recorded: none is guessed
        "Pruning ratio (%)": ["0.00", f"{steps[-1].ratio:.2f}", "—"],
    }
    assert "- **Model layout:** —" in text
    assert "- **Removed blocks:** attention [5]; MLP [6]" in text  # the last step's plan
    assert f"width set:** — (dense) → {steps[-1].ppl:.3f} (final)" in text
    assert "block set:** — (dense) → — (final)" in text
    assert [row[0] for row in _rows(text, "Search steps")] == ["0", "1", "2", "3", "4"]


def test_missing_or_empty_run_dir_is_named(tmp_path):
    missing = tmp_path / "no_such_run"
    with pytest.raises(RunDirError, match=re.escape(str(missing))):
        write_report(missing)
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(RunDirError, match=re.escape(str(empty)) + ".*steps.jsonl"):
        write_report(empty)
    assert not (empty / "report.md").exists()


def test_corrupt_steps_line_is_an_error(tmp_path):
    _write_typed_run(tmp_path)
    steps_file = tmp_path / "steps.jsonl"
    good = steps_file.read_text()
    steps_file.write_text(good + '{"step": 99, "stage": "attn')  # a torn last line: a killed run
    assert [s.step for s in load_run(tmp_path).steps] == [0, 1, 2, 3, 4]
    lines = good.splitlines()
    lines[2] = lines[2][:40]  # step 1, in the middle of the log
    steps_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(RunDirError, match="line 3 is corrupt"):
        write_report(tmp_path)
    assert not (tmp_path / "report.md").exists()


def test_plot_functions_take_typed_data():
    steps, plan = _steps()
    fig = plot_trajectory(steps, DENSE)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[:3] == ["block (2 steps)", "mlp_width (2 steps)", "attn_width (1 steps)"]
    assert any("width set (ppl 17.00)" in label for label in labels)
    assert plot_trajectory([], None).axes  # an empty run still draws
    structure = plot_structure(plan, LAYOUT, ratio=10.0)
    assert len(structure.axes) == 3
    assert "1 of 8 attention and 1 of 8 MLP blocks removed; 10.0%" in structure.get_suptitle()
    heads = [bar.get_height() for bar in structure.axes[2].patches]
    assert heads == [9.0, 6.0, 9.0, 9.0, 9.0, 0.0, 9.0, 9.0]
    assert plot_comparison(None, None, None) is None
    dense = _eval(LAYOUT.dense_params(), 20.5, (0.66, 0.681), 0.60)
    pruned = _eval(plan.num_params(LAYOUT), 27.25, (0.62, 0.642), 0.63)
    both = plot_comparison(dense, pruned, {"prefill_speedup": 1.3, "disk_ratio": None})
    assert len(both.axes) == 2
    dense_bars = [bar.get_height() for bar in both.axes[0].patches[:3]]
    assert dense_bars == pytest.approx([68.1, 60.0, 64.05])  # PIQA acc_norm, BoolQ acc, their mean
    assert [t.get_text() for t in both.axes[1].get_xticklabels()] == ["prefill\nspeed-up"]
    assert len(plot_comparison(None, None, {"decode_speedup": 1.1}).axes) == 1


def test_a_run_with_every_phase_reports_each_models_held_out_perplexity(
    tiny_model_dir, calibration_txt, tmp_path
):
    """What the main job does (scripts/prune-default.sh), on a tiny model: the dense model and each saved
    model evaluated on held-out text, shown side by side with the commands for the full numbers."""
    from conftest import prune_args

    from multipruner.cli import build_parser, main

    run = tmp_path / "run"
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(calibration_txt.read_text()[::-1])  # text the run did not calibrate on
    phases = ["--extract", "--compensate", "--recover", "--recover-max-steps", "2", "--recover-seqlen", "16"]
    phases += ["--recover-data", str(calibration_txt), "--max-steps", "3"]
    evaluation = ["--do-eval", "--eval-tasks", str(held_out), "--eval-seqlen", "16"]
    evaluation += ["--eval-max-windows", "3"]
    assert main(prune_args(tiny_model_dir, run, calibration_txt, *phases, *evaluation)) == 0
    models = ("dense", "pruned", "compensated", "recovered")
    results = {w: EvalResult.read(run / f"eval_{w}.json").tasks["held_out"]["ppl"] for w in models}
    assert {m.n for m in results.values()} == {3}  # --eval-max-windows: a quick check
    assert len({m.value for m in results.values()}) == 4  # four different models were measured
    shown = {w: f"{m.value:.2f}" for w, m in results.items()}
    text = (run / "report.md").read_text()

    table = {row[0]: row[1:] for row in _rows(text, "Dense vs pruned")}
    assert table["held_out perplexity"][:2] == [shown["dense"], shown["pruned"]]
    section = "Winning back quality: pruned → compensated → recovered"
    side_by_side = {row[0]: row[1:] for row in _rows(text, section)}
    assert side_by_side["held_out perplexity"] == [shown[w] for w in models]
    assert "Perplexities use windows of 16 tokens (held_out: 3 windows)." in text
    assert "Zero-shot" not in text  # none ran, so no note on their example limit

    commands = text.split("```sh\n", 1)[1].split("```", 1)[0].splitlines()
    saved = [run / "model", run / "model-compensated", run / "model-recovered"]
    assert commands == [
        f"multipruner eval --model {m} --tasks wikitext2,ptb" for m in (tiny_model_dir, *saved)
    ]
    for command in commands:  # each is a command the CLI takes
        args = build_parser().parse_args(command.split()[1:])
        assert args.command == "eval" and args.tasks == ["wikitext2", "ptb"]
