"""Latency budgets (search/latency.py): the table's fit, its storage with the run, and its refusal
elsewhere; a decode budget pruned end to end on a tiny model."""

from __future__ import annotations

import json
import random

import pytest
from conftest import extract_args, prune_args
from test_surgery import random_plan

from multipruner import PrunableModel, PruningPlan
from multipruner.cli import main
from multipruner.search.cost import Budget, Cost
from multipruner.search.latency import (
    LatencyTable,
    LatencyTableError,
    layout_fingerprint,
    measure_table,
    time_table,
    timed_widths,
)

DESCRIBE = dict(device="cpu: test", model="m", dtype="float32", workload="decode", batch_size=1, context=8)


def _additive_timer(layout, fixed=0.5, attention=lambda q: 0.01 + 2e-4 * q, mlp=lambda w: 0.02 + 1e-4 * w):
    """A device whose time is exactly the sum the table models, with costs linear in the width."""

    def time_of(plan: PruningPlan) -> float:
        total = fixed
        for i in range(plan.num_layers):
            total += 0 if i in plan.removed_attention else attention(plan.attention_width[i])
            total += 0 if i in plan.removed_mlp else mlp(plan.mlp_width[i])
        return total

    return time_of, lambda plans: lambda k: time_of(plans[k])


def test_a_table_timed_on_an_additive_device_predicts_every_plan(tiny_llama):
    layout = PrunableModel.prepare(tiny_llama, weight_reorder=False).layout
    time_of, timers = _additive_timer(layout)
    unit = layout.heads.unit_channels
    widths = {
        "mlp": timed_widths(layout.mlp_width, 8, most=4),
        "attention": timed_widths(layout.attention_width, unit, unit),
    }
    assert (
        len(widths["mlp"]) == 4
        and widths["mlp"][0] == layout.mlp_width
        and widths["mlp"][-1] == layout.mlp_width % 8
        or 8
    )
    table = measure_table(layout, widths, timers, repeats=3, describe=DESCRIBE)
    rng = random.Random(0)
    for plan in [PruningPlan.dense(layout), *(random_plan(layout, rng) for _ in range(20))]:
        if not all(min(widths["mlp"]) <= w for w in plan.mlp_width):
            continue
        assert table.of(plan) == pytest.approx(time_of(plan), rel=1e-9)
    cost = Cost(layout, "decode-latency", latency=table)
    assert Budget.parse("decode=1.25x").reduction(cost) == pytest.approx(20.0)


def test_a_table_reloads_identically_and_is_refused_for_another_device_model_or_workload(
    tiny_llama, tmp_path
):
    layout = PrunableModel.prepare(tiny_llama, weight_reorder=False).layout
    table = measure_table(
        layout,
        {"mlp": [96, 48], "attention": timed_widths(layout.attention_width, 16, 16)},
        _additive_timer(layout)[1],
        repeats=1,
        describe={**DESCRIBE, "model": layout_fingerprint(layout)},
    )
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table.to_dict()))
    again = LatencyTable.from_dict(json.loads(path.read_text()))
    assert again == table
    again.check_matches("cpu: test", layout, "float32", ("decode", 1, 8))
    other_layout = type(layout).from_dict({**layout.to_dict(), "num_layers": layout.num_layers + 1})
    for args, message in [
        (("cpu: another", layout, "float32", ("decode", 1, 8)), "measured on 'cpu: test'"),
        (("cpu: test", other_layout, "float32", ("decode", 1, 8)), "another model or dtype"),
        (("cpu: test", layout, "bfloat16", ("decode", 1, 8)), "another model or dtype"),
        (("cpu: test", layout, "float32", ("prefill", 1, 8)), "the budget asks prefill"),
    ]:
        with pytest.raises(LatencyTableError, match=message):
            again.check_matches(*args)


def _prune(model_dir, run_dir, calib, *extra):
    args = prune_args(model_dir, run_dir, calib, *extra)
    i = args.index("--pruning_distribution")
    return args[:i] + args[i + 2 :]  # the tests give their own distribution


@pytest.fixture
def steady_device(monkeypatch):
    """A device whose every run takes a fixed time plus one proportional to the model's parameters: a tiny
    model's real timings are mostly noise and overhead on a shared machine."""

    def timer(model, kind, batch_size, context):
        return lambda: 1e-3 + 1e-8 * sum(p.numel() for p in model.parameters())

    monkeypatch.setattr("multipruner.search.latency.workload_timer", timer)


def test_a_decode_budget_is_timed_searched_and_resumed_with_its_table(
    tiny_model_dir, calibration_txt, tmp_path, monkeypatch, capsys, steady_device
):
    run = tmp_path / "run"
    budget = [
        "--budget",
        "decode=1.15x",
        "--cost-context",
        "16",
        "--distribution",
        "auto",
        "--max-steps",
        "1",
    ]
    assert main(_prune(tiny_model_dir, run, calibration_txt, *budget)) == 0
    table = json.loads((run / "latency_table.json").read_text())
    assert table["workload"] == "decode" and table["context"] == 16 and table["timed_models"] >= 5
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert steps[-1]["measure"] == "decode-latency" and all(
        c["saved_cost"] > 0 for c in steps[-1]["candidates"]
    )
    before = (run / "latency_table.json").read_bytes()
    # resumed on another device, the run is refused before any step: its timings are not this device's
    with monkeypatch.context() as patch:
        for where in ("multipruner.run.search_phase", "multipruner.search.latency"):
            patch.setattr(f"{where}.device_name", lambda device: "cpu: elsewhere")
        assert main(_prune(tiny_model_dir, run, calibration_txt, *budget[:-2], "--resume")) == 2
    assert len((run / "steps.jsonl").read_text().splitlines()) == len(steps)
    # here, a resume reuses the table as it is (timings would differ) and finishes the budget
    assert main(_prune(tiny_model_dir, run, calibration_txt, *budget[:-2], "--resume")) == 0
    assert (run / "latency_table.json").read_bytes() == before
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert steps[-1]["reduction"] >= 100 * (1 - 1 / 1.15) > steps[-2]["reduction"]
    report = (run / "report.md").read_text()
    reached = (
        f"reached {steps[-1]['reduction']:.2f} % less decode-latency (the device's latency table's estimate)"
    )
    assert f"**Budget:** decode=1.15x (--distribution auto); {reached}" in report
    # bench times the saved model on the budget's workload and prints it beside the target
    assert main(extract_args(tiny_model_dir, run / "plan.json", tmp_path / "pruned")) == 0
    bench = ["bench", "--model", str(tmp_path / "pruned"), "--dense", str(tiny_model_dir), "--repeats", "1"]
    assert main([*bench, "--new-tokens", "2", "--seqlen", "16", "--output", str(run / "bench.json")]) == 0
    assert "budget decode=1.15x: measured decode speed-up" in capsys.readouterr().out
    checked = json.loads((run / "bench.json").read_text())["budget"]
    assert checked["workload"] == ["decode", 1, 16] and checked["measured_speedup"] > 0
    # and the report puts the measured speed-up beside the estimate
    assert main(["report", str(run)]) == 0
    measured = f"`bench` measured a {checked['measured_speedup']:.3f}x decode speed-up (median of 1)"
    assert f"{reached}; {measured}" in (run / "report.md").read_text()


def test_an_unreachable_decode_budget_is_refused_with_the_most_it_can_give(
    tiny_model_dir, calibration_txt, tmp_path, capsys, steady_device
):
    run = tmp_path / "run"
    assert (
        main(
            _prune(tiny_model_dir, run, calibration_txt, "--budget", "decode=100x", "--distribution", "auto")
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        "cannot be reached: the most this model can lose of its decode-latency is" in err
        and "Traceback" not in err
    )
    assert not (run / "steps.jsonl").exists()  # refused before the calibration and the dense record


def test_real_timings_make_a_table_of_every_timed_width(tiny_llama):
    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=False)
    layout = prunable.layout
    for workload in (("decode", 1, 8), ("prefill", 2, 8)):
        table = time_table(prunable, workload, (24, layout.heads.unit_channels), repeats=1)
        assert sorted(table.mlp_s) == sorted(timed_widths(layout.mlp_width, 24))
        assert table.timed_models == 3 + len(table.mlp_s) + len(table.attention_s)
        assert all(v >= 0 for v in (*table.mlp_s.values(), *table.attention_s.values()))
        assert table.meta["medians_s"]["dense"] > 0 and table.workload == workload[0]
    assert prunable.plan == PruningPlan.dense(layout)  # the timing left the model as it was
