"""The baselines as presets of the same tool: ShortGPT's Block Influence and layer removal, BlockPruner's
blocks-only search, and both writing run directories that extract, eval and report accept."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import extract_args, prune_args

from multipruner import PrunableModel
from multipruner.cli import main
from multipruner.search.settings import SearchSettings
from multipruner.search.shortgpt import block_influence, run_shortgpt


def _hand_block_influence(model, tokens) -> list[float]:
    """1 - mean cosine between each layer's input and output, from forward hooks on the outputs."""
    outputs = []
    layers = model.model.layers
    handles = [
        layer.register_forward_hook(
            lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out)
        )
        for layer in layers
    ]
    with torch.no_grad():
        embedded = model.model.embed_tokens(tokens)
        model.model(input_ids=tokens, use_cache=False)
    for handle in handles:
        handle.remove()
    inputs = [embedded, *outputs[:-1]]
    bi = []
    for x, y in zip(inputs, outputs, strict=True):
        x, y = x.double().reshape(-1, x.shape[-1]), y.double().reshape(-1, y.shape[-1])
        cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
        bi.append(1.0 - cos.mean().item())
    return bi


def test_block_influence_matches_a_hand_calculation(tiny_llama):
    tokens = torch.randint(
        0, tiny_llama.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(0)
    )
    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=False)
    got = block_influence(prunable, tokens, batch_size=3)  # uneven batches: a mean over tokens, not batches
    assert got == pytest.approx(_hand_block_influence(tiny_llama, tokens), rel=1e-6, abs=1e-9)
    assert len(set(got)) == len(got)  # distinct, so the order below is meaningful


def test_shortgpt_removes_whole_layers_lowest_influence_first(tiny_llama):
    tokens = torch.randint(
        0, tiny_llama.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(0)
    )
    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=False)
    influence = block_influence(prunable, tokens, batch_size=2)
    settings = SearchSettings(method="shortgpt", target_ratio=30.0).resolved(prunable.layout)
    records = []
    plan = run_shortgpt(
        prunable, lambda: 1.0, tokens, settings, on_step=lambda record, plan: records.append(record)
    )
    assert plan.removed_attention == plan.removed_mlp  # whole layers only
    assert plan.attention_width == (prunable.layout.attention_width,) * prunable.layout.num_layers
    removed = [r.choice["layer"] for r in records]
    assert removed == sorted(range(len(influence)), key=lambda i: influence[i])[: len(removed)]
    assert plan.ratio(prunable.layout) >= 30.0 and records[-2].ratio < 30.0  # stops at the first step past it
    assert [r.ratio for r in records] == sorted(r.ratio for r in records)


def test_shortgpt_stops_at_a_budget_in_another_measure(tiny_llama):
    tokens = torch.randint(
        0, tiny_llama.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(0)
    )
    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=False)
    settings = SearchSettings(method="shortgpt", budget="kv=40%", cost_context=12).resolved(prunable.layout)
    records = []
    run_shortgpt(prunable, lambda: 1.0, tokens, settings, on_step=lambda record, plan: records.append(record))
    # a layer holds a quarter of the KV cache: the second removal reaches 40 %, the first did not
    assert [r.measure for r in records] == ["kv-bytes"] * 2
    assert [r.reduction for r in records] == pytest.approx([25.0, 50.0])


@pytest.mark.parametrize("method", ["blockpruner", "shortgpt"])
def test_presets_write_run_directories_that_extract_eval_and_report_accept(
    tiny_model_dir, calibration_txt, tmp_path, method
):
    run = tmp_path / "run"
    args = [a for a in prune_args(tiny_model_dir, run, calibration_txt) if a != "40:40:20"]
    args.remove("--pruning_distribution")
    assert main([*args, "--method", method]) == 0
    plan = json.loads((run / "plan.json").read_text())
    assert plan["attention_width"] == [plan["layout"]["num_heads"] * plan["layout"]["head_dim"]] * 4
    assert plan["mlp_width"] == [plan["layout"]["mlp_width"]] * 4  # no width was touched
    if method == "shortgpt":
        assert plan["removed_attention"] == plan["removed_mlp"] != []
    stages = {json.loads(line)["stage"] for line in (run / "steps.jsonl").read_text().splitlines()[1:]}
    assert stages == ({"layer"} if method == "shortgpt" else {"block"})
    out = tmp_path / "pruned"
    assert main(extract_args(tiny_model_dir, run / "plan.json", out)) == 0
    eval_out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(out),
                "--tasks",
                str(calibration_txt),
                "--seqlen",
                "16",
                "--output",
                str(eval_out),
            ]
        )
        == 0
    )
    assert json.loads(eval_out.read_text())["meta"]["dense_params"] == plan["params"]["dense"]
    assert main(["report", str(run)]) == 0
    removed = (plan["removed_attention"] or "none", plan["removed_mlp"] or "none")
    assert (
        f"- **Removed blocks:** attention {removed[0]}; MLP {removed[1]}" in (run / "report.md").read_text()
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "shortgpt", "--distribution", "1:1:1"], "shortgpt removes whole layers in one shot"),
        (["--method", "blockpruner", "--distribution", "50:50:0"], "blocks only"),
    ],
)
def test_preset_misuse_fails_before_anything_is_written(
    tiny_model_dir, calibration_txt, tmp_path, capsys, extra, message
):
    run = tmp_path / "run"
    args = [a for a in prune_args(tiny_model_dir, run, calibration_txt) if a != "40:40:20"]
    args.remove("--pruning_distribution")
    assert main([*args, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()


def test_unknown_method_is_refused(tiny_model_dir, calibration_txt, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*prune_args(tiny_model_dir, tmp_path / "run", calibration_txt), "--method", "slicegpt"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'slicegpt'" in capsys.readouterr().err
