"""Speed measurement on tiny random models, and the run report from a synthetic run directory."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM

from multipruner.evaluation.report import (
    LayerStructure,
    RunData,
    comparison_rows,
    plot_comparison,
    plot_structure,
    plot_trajectory,
    read_steps,
    write_report,
)
from multipruner.evaluation.speed import (
    SpeedResult,
    compare_speed,
    directory_size_mb,
    format_speed_table,
    measure_side_by_side,
    measure_speed,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST = {"seqlen": 16, "new_tokens": 3, "repeats": 2, "warmup": 1}


def _llama(layers: int, hidden: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=True,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


# =========================================================================== speed
@pytest.fixture(scope="module")
def side_by_side() -> dict[str, SpeedResult]:
    models = {"dense": _llama(4), "pruned": _llama(2)}
    return measure_side_by_side(models, batch_size=2, **FAST)


def _finite_positive(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_speed_fields_are_positive_finite(side_by_side):
    for name, r in side_by_side.items():
        assert isinstance(r, SpeedResult), name
        for attr in (
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
            "peak_memory_mb",
            "weights_mb",
            "kv_cache_mb",
        ):
            assert _finite_positive(getattr(r, attr)), (name, attr, getattr(r, attr))
        assert (r.batch_size, r.seqlen, r.new_tokens, r.decode_prompt_len) == (2, 16, 3, 16)
        assert r.disk_mb is None
        assert r.memory_method == "weights+kv_cache"
        assert r.peak_memory_mb == pytest.approx(r.weights_mb + r.kv_cache_mb)


def test_speed_counts_params_and_cache(side_by_side):
    for name, layers in (("dense", 4), ("pruned", 2)):
        model = _llama(layers)
        r = side_by_side[name]
        assert r.params == sum(p.numel() for p in model.parameters())
        # Tied head counted once: embedding + per-layer weights + final norm.
        per_layer = 64 * 64 * 2 + 64 * 16 * 2 + 3 * 64 * 96 + 2 * 64
        assert r.params == 128 * 64 + layers * per_layer + 64
        # KV cache: K and V, [batch 2, kv heads 2, prompt 16 + 3 new - 1 last unfed, head_dim 8] fp32 per layer.
        cached = 16 + 3 - 1
        assert r.kv_cache_mb * 1024**2 == pytest.approx(layers * 2 * 2 * 2 * cached * 8 * 4, rel=0.15)


def test_compare_speed_ratios_are_quotients(side_by_side):
    comparison = compare_speed(side_by_side)
    d, p = side_by_side["dense"], side_by_side["pruned"]
    ratios = comparison["ratios"]
    assert ratios["prefill_speedup"] == pytest.approx(p.prefill_tokens_per_s / d.prefill_tokens_per_s)
    assert ratios["decode_speedup"] == pytest.approx(p.decode_tokens_per_s / d.decode_tokens_per_s)
    assert ratios["memory_ratio"] == pytest.approx(p.peak_memory_mb / d.peak_memory_mb)
    assert ratios["params_ratio"] == pytest.approx(p.params / d.params)
    assert ratios["disk_ratio"] is None
    assert set(comparison["models"]["dense"]) == {f.name for f in fields(SpeedResult)}
    json.dumps(comparison)  # bench.json must be serialisable
    table = format_speed_table(comparison)
    assert "dense" in table and "pruned/dense" in table
    assert f"{ratios['params_ratio']:.3f}x" in table
    with pytest.raises(ValueError, match="pruned"):
        compare_speed({"dense": d})


def test_measure_speed_with_disk_path(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 1024**2)
    (tmp_path / "sub" / "b.bin").write_bytes(b"x" * (1024**2 // 2))
    assert directory_size_mb(tmp_path) == pytest.approx(1.5)
    model = _llama(1)
    model.train()
    r = measure_speed(model, seqlen=8, new_tokens=2, repeats=1, warmup=0, disk_path=tmp_path)
    assert r.disk_mb == pytest.approx(1.5)
    assert model.training, "the model's train/eval mode is restored"
    with pytest.raises(FileNotFoundError, match="nope"):
        directory_size_mb(tmp_path / "nope")


def test_deeper_model_prefills_slower():
    # 16 layers vs 1 at 128 tokens: ~10x more work; CPU noise cannot close that gap.
    results = measure_side_by_side(
        {"dense": _llama(16), "pruned": _llama(1)}, seqlen=128, new_tokens=1, repeats=3, warmup=1
    )
    assert results["dense"].prefill_tokens_per_s < results["pruned"].prefill_tokens_per_s


# =========================================================================== report
LAYERS, HEADS, HEAD_DIM, MLP = 8, 9, 64, 1536
LAYOUT = {
    "model_type": "llama",
    "num_layers": LAYERS,
    "hidden_size": 576,
    "mlp_width": MLP,
    "num_heads": HEADS,
    "num_kv_heads": 3,
    "head_dim": HEAD_DIM,
}


def _synthetic_steps() -> list[dict]:
    """A plausible search: two block removals, two MLP shrinks, one attention shrink."""
    removed_attn: list[int] = []
    removed_mlp: list[int] = []
    attn_w = {str(i): HEADS * HEAD_DIM for i in range(LAYERS)}
    mlp_w = {str(i): MLP for i in range(LAYERS)}
    choices = [
        ("block", "attention", "remove", 5, None),
        ("block", "mlp", "remove", 6, None),
        ("mlp_width", "mlp", "shrink", 2, 1280),
        ("mlp_width", "mlp", "shrink", 3, 1024),
        ("attn_width", "attention", "shrink", 1, 6 * HEAD_DIM),
    ]
    steps, ppl, ratio, params = [], 18.2, 0.0, 134_515_008
    for n, (stage, kind, op, layer, width) in enumerate(choices):
        if op == "remove":
            (removed_attn if kind == "attention" else removed_mlp).append(layer)
        else:
            (attn_w if kind == "attention" else mlp_w)[str(layer)] = width
        ppl, ratio, params = ppl * 1.15, ratio + 2.5, params - 3_000_000
        choice = {"kind": kind, "op": op, "layer": layer, "width": width, "ppl": ppl}
        steps.append(
            {
                "step": n,
                "stage": stage,
                "candidates": [choice, {**choice, "layer": layer + 1, "ppl": ppl * 1.1}],
                "choice": choice,
                "ppl": ppl,
                "ratio": ratio,
                "params": params,
                "elapsed_s": 30.0,
                "plan": {
                    "pruned_attn_idx": sorted(removed_attn),
                    "pruned_mlp_idx": sorted(removed_mlp),
                    "pruned_attn_width": dict(attn_w),
                    "pruned_mlp_width": dict(mlp_w),
                },
            }
        )
    return steps


def _write_steps(run: Path, steps: list[dict], dense: bool = True) -> None:
    lines = (
        [json.dumps({"step": -1, "stage": "dense", "ppl": 18.2, "ratio": 0.0, "params": 134_515_008})]
        if dense
        else []
    )
    lines += [json.dumps(s) for s in steps]
    torn = json.dumps({"step": 99, "stage": "attn_width", "ppl": 1.0})[:25]
    (run / "steps.jsonl").write_text("\n".join(lines) + "\n" + torn)


def _write_full_run(run: Path) -> None:
    run.mkdir()
    steps = _synthetic_steps()
    _write_steps(run, steps)
    last = steps[-1]["plan"]
    plan = {
        "format": "multipruner-plan/1",
        "removed_attention": last["pruned_attn_idx"],
        "removed_mlp": last["pruned_mlp_idx"],
        "attention_width": [last["pruned_attn_width"][str(i)] for i in range(LAYERS)],
        "mlp_width": [last["pruned_mlp_width"][str(i)] for i in range(LAYERS)],
        "layout": LAYOUT,
        "params": {"dense": 134_515_008, "pruned": 119_515_008, "ratio": 11.15},
    }
    (run / "plan.json").write_text(json.dumps(plan))
    dense_eval = {
        "total_params": 134_515_008,
        "pruned_model_params": 134_515_008,
        "ratio": 0.0,
        "ppl_wikitext2": 20.5,
        "piqa": 68.1,
        "winogrande": 52.3,
        "hellaswag": 43.0,
        "arc_easy": 58.9,
        "arc_challenge": 29.7,
        "5cs_acc_avg": 50.4,
    }
    pruned_eval = {
        "total_params": 134_515_008,
        "pruned_model_params": 119_515_008,
        "ratio": 11.15,
        "ppl_wikitext2": 27.25,
        "piqa": 64.2,
        "winogrande": 51.0,
        "hellaswag": 38.1,
        "arc_easy": 52.4,
        "arc_challenge": 27.1,
        "5cs_acc_avg": None,
    }
    (run / "eval_dense.json").write_text(json.dumps(dense_eval))
    (run / "eval_pruned.json").write_text(json.dumps(pruned_eval))
    common = {
        "batch_size": 1,
        "seqlen": 512,
        "new_tokens": 64,
        "kv_cache_mb": 3.0,
        "decode_prompt_len": 128,
        "memory_method": "weights+kv_cache",
        "device": "cpu",
    }
    dense = SpeedResult(
        params=134_515_008,
        prefill_tokens_per_s=2000.0,
        decode_tokens_per_s=40.0,
        peak_memory_mb=520.0,
        disk_mb=540.0,
        weights_mb=517.0,
        **common,
    )
    pruned = SpeedResult(
        params=119_515_008,
        prefill_tokens_per_s=2400.0,
        decode_tokens_per_s=50.0,
        peak_memory_mb=460.0,
        disk_mb=480.0,
        weights_mb=457.0,
        **common,
    )
    (run / "bench.json").write_text(json.dumps(compare_speed({"dense": dense, "pruned": pruned})))


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    with Image.open(path) as image:
        image.load()
        assert image.size[0] > 100 and image.size[1] > 100, (path, image.size)


def test_read_steps_skips_torn_line(tmp_path):
    _write_steps(tmp_path, _synthetic_steps())
    records = read_steps(tmp_path / "steps.jsonl")
    assert [r["step"] for r in records] == [-1, 0, 1, 2, 3, 4]


def test_full_report(tmp_path):
    run = tmp_path / "run"
    _write_full_run(run)
    report = write_report(run)
    assert report == run / "report.md"
    text = report.read_text()
    for png in ("trajectory.png", "structure.png", "comparison.png"):
        _assert_png(run / png)
        assert f"]({png})" in text
    assert "| Parameters | 134.52M | 119.52M | 0.888× |" in text
    assert "| WikiText-2 perplexity | 20.50 | 27.25 | 1.329× |" in text
    assert "| PIQA acc (%) | 68.10 | 64.20 | -3.90 pt |" in text
    assert "| 5-task average acc (%) | 50.40 | — | — |" in text
    assert "| Prefill tokens/s | 2000.0 | 2400.0 | 1.200× |" in text
    assert "| Decode tokens/s | 40.0 | 50.0 | 1.250× |" in text
    assert "| Disk size (MB) | 540.0 | 480.0 | 0.889× |" in text
    assert "**Pruning ratio reached:** 11.15 %" in text
    assert "block 2, mlp_width 2, attn_width 1" in text
    assert "2m 30s" in text  # 5 steps x 30 s
    assert "| 4 | attn_width | shrink attention L1 → 384 (6 heads) |" in text
    assert "| 99 |" not in text  # the torn line
    assert not list(run.glob(".*.tmp")), "no temp files left behind"


def test_report_from_steps_only_into_out_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _write_steps(run, _synthetic_steps(), dense=False)
    out = tmp_path / "out"
    report = write_report(run, out_dir=out)
    assert report == out / "report.md"
    text = report.read_text()
    _assert_png(out / "trajectory.png")
    _assert_png(out / "structure.png")
    assert not (out / "comparison.png").exists()
    assert "comparison.png" not in text
    # Dense params follow from the last step's params and ratio (119.515008M at 12.5 %).
    assert "| Parameters | 136.59M | 119.52M | 0.875× |" in text
    assert "Removed blocks:** attention [5]; MLP [6]" in text


def test_missing_run_dir_is_named(tmp_path):
    missing = tmp_path / "no_such_run"
    with pytest.raises(FileNotFoundError, match="no_such_run"):
        write_report(missing)
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="steps.jsonl"):
        write_report(empty)


def test_plot_functions_take_data():
    steps = _synthetic_steps()
    assert plot_trajectory(steps, dense_ppl=18.2).axes
    marked = plot_trajectory(steps, dense_ppl=18.2, dense_width_ppl=17.0).axes[0]
    assert any("width set" in t.get_text() for t in marked.get_legend().get_texts())
    assert plot_trajectory([]).axes  # an empty run still draws
    structure = LayerStructure.from_reference(steps[-1]["plan"], head_dim=HEAD_DIM, num_heads=HEADS)
    assert structure.num_layers == LAYERS
    assert structure.full_mlp_width == MLP and structure.mlp_width[3] == 1024
    assert len(plot_structure(structure, ratio=10.0).axes) == 3
    assert plot_comparison(None, None, None) is None
    assert len(plot_comparison({"piqa": 60.0}, {"piqa": 55.0}, {"prefill_speedup": 1.3}).axes) == 2
    assert len(plot_comparison(None, None, {"decode_speedup": 1.1}).axes) == 1


def test_comparison_names_metric_and_averages_tasks_without_winogrande():
    def evaluation(piqa, boolq):
        return {
            "ppl_wikitext2": 20.0,
            "piqa": piqa,
            "boolq": boolq,
            "5cs_acc_avg": None,
            "details": {
                "tasks": {
                    "piqa": {"acc": 0.6, "acc_norm": piqa / 100},
                    "boolq": {"acc": boolq / 100, "acc_norm": None},
                }
            },
        }

    run = RunData(
        run_dir=Path("run"),
        steps=[],
        dense_step=None,
        plan=None,
        eval_dense=evaluation(66.0, 40.0),
        eval_pruned=evaluation(64.0, 50.0),
        bench=None,
    )
    rows = {label: (dense, pruned, change) for label, dense, pruned, change in comparison_rows(run)}
    assert rows["PIQA acc_norm (%)"] == ("66.00", "64.00", "-2.00 pt")
    assert rows["BoolQ acc (%)"] == ("40.00", "50.00", "+10.00 pt")
    assert rows["Average of these 2 tasks (%)"] == ("53.00", "57.00", "+4.00 pt")
    assert not any(label.startswith("5-task") for label in rows)
