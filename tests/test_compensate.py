"""Closed-form compensation: a no-op when nothing is narrowed, the least-squares optimum when something is."""

from __future__ import annotations

import pytest
import torch
from conftest import extract_args, rel_err

from multipruner import PrunableModel, PruningPlan, extract, save_pruned
from multipruner.core.checkpoint import load_pruned
from multipruner.repair.compensate import (
    CompensateSettings,
    CompensationError,
    compensate,
    reconstruction_error,
    ridge_refit,
)


def _tokens(vocab: int, n: int = 6, seqlen: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _narrow_plan(layout) -> PruningPlan:
    unit = layout.heads.unit_channels
    return (
        PruningPlan.dense(layout)
        .with_width("mlp", 0, layout.mlp_width // 2)
        .with_width("attention", 1, max(unit, layout.attention_width - unit))
        .without_block("mlp", 2)
    )


def test_a_plan_that_narrows_nothing_leaves_outputs_unchanged(tiny_model, token_ids):
    prunable = PrunableModel.prepare(tiny_model, weight_reorder=True)
    plan = PruningPlan.dense(prunable.layout).without_block("attention", 1)  # removes, narrows nothing
    pruned = extract(prunable, plan)
    before = pruned(token_ids).logits
    fits = compensate(prunable, pruned, plan, _tokens(tiny_model.config.vocab_size), progress=False)
    assert fits == []
    assert torch.equal(pruned(token_ids).logits, before)


def test_ridge_refit_without_damping_is_the_least_squares_solution():
    torch.manual_seed(0)
    x_full = torch.randn(500, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64)
    w_full = torch.randn(7, 12, dtype=torch.float64)
    gram = x_full.T @ x_full
    w = ridge_refit(w_full, gram, kept=5, damping=0.0)
    direct = torch.linalg.lstsq(x_full[:, :5], x_full @ w_full.T).solution.T  # min ||Y - X_k W^T||
    assert torch.allclose(w, direct, atol=1e-8)
    before = reconstruction_error(w_full, w_full[:, :5], gram)
    after = reconstruction_error(w_full, w, gram)
    assert after < before
    assert after == pytest.approx(((x_full @ w_full.T - x_full[:, :5] @ w.T) ** 2).sum().item(), rel=1e-9)


def test_damping_pulls_towards_plain_pruning_and_never_makes_the_fit_worse():
    torch.manual_seed(1)
    x_full = torch.randn(200, 10, dtype=torch.float64) * torch.linspace(0.1, 3, 10, dtype=torch.float64)
    w_full = torch.randn(6, 10, dtype=torch.float64)
    gram = x_full.T @ x_full
    plain = reconstruction_error(w_full, w_full[:, :4], gram)
    errors = [
        reconstruction_error(w_full, ridge_refit(w_full, gram, 4, d), gram) for d in (0.0, 0.1, 10.0, 1e6)
    ]
    assert errors == sorted(errors) and errors[-1] <= plain
    assert torch.allclose(ridge_refit(w_full, gram, 4, 1e9), w_full[:, :4], atol=1e-6)


def test_compensation_lowers_every_narrowed_branch_error_to_the_optimum(tiny_model):
    prunable = PrunableModel.prepare(tiny_model, weight_reorder=True)
    plan = _narrow_plan(prunable.layout)
    pruned = extract(prunable, plan)
    tokens = _tokens(tiny_model.config.vocab_size, n=8)
    fits = compensate(prunable, pruned, plan, tokens, CompensateSettings(damping=0.0), progress=False)
    assert {(f.kind, f.layer) for f in fits} == {("mlp", 0), ("attention", 1)}
    for fit in fits:
        assert fit.error_after <= fit.error_before
        assert fit.error_after < fit.error_before * 0.999 or fit.error_before == 0


def test_compensated_layer_equals_direct_lstsq_on_the_same_activations(tiny_llama):
    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=True)
    layout = prunable.layout
    plan = PruningPlan.dense(layout).with_width("mlp", 0, 24)  # layer 0 only: its inputs need no earlier fit
    pruned = extract(prunable, plan)
    tokens = _tokens(tiny_llama.config.vocab_size, n=8)
    captured = []
    dense_mlp = tiny_llama.model.layers[0].mlp
    handle = dense_mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, 96)))
    with torch.no_grad():
        tiny_llama(tokens)
    handle.remove()
    x_full = torch.cat(captured).double()
    w_full = dense_mlp.down_proj.weight.double()
    direct = torch.linalg.lstsq(x_full[:, :24], x_full @ w_full.T).solution.T
    compensate(prunable, pruned, plan, tokens, CompensateSettings(damping=0.0), progress=False)
    got = pruned.model.layers[0].mlp.down_proj.weight.double()
    assert torch.allclose(got, direct, rtol=1e-4, atol=1e-5)
    assert not torch.equal(got, w_full[:, :24])


def test_compensated_model_saves_and_reloads_identically(tiny_model, token_ids, tmp_path):
    prunable = PrunableModel.prepare(tiny_model, weight_reorder=True)
    dense_logits = tiny_model(token_ids).logits
    plan = _narrow_plan(prunable.layout)
    pruned = extract(prunable, plan)
    compensate(prunable, pruned, plan, _tokens(tiny_model.config.vocab_size), progress=False)
    save_pruned(pruned, None, tmp_path / "comp", plan, prunable.layout)
    reloaded, _ = load_pruned(tmp_path / "comp")
    assert rel_err(reloaded(token_ids).logits, pruned(token_ids).logits) < 1e-6
    # the dense model it shares storage with is untouched
    prunable.restore()
    assert torch.equal(tiny_model(token_ids).logits, dense_logits)


def test_bad_inputs_fail_clearly(tiny_llama):
    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=True)
    plan = PruningPlan.dense(prunable.layout).with_width("mlp", 0, 48)
    pruned = extract(prunable, plan)
    with pytest.raises(CompensationError, match="damping must be 0 or more"):
        compensate(prunable, pruned, plan, _tokens(128), CompensateSettings(damping=-1.0), progress=False)
    with pytest.raises(CompensationError, match="under-determined; give at least 192 tokens"):
        compensate(prunable, pruned, plan, _tokens(128, n=1, seqlen=20), progress=False)


def test_prune_compensate_and_the_compensate_command(tiny_model_dir, calibration_txt, tmp_path, capsys):
    import json

    from test_cli import prune_args

    from multipruner.cli import main

    run = tmp_path / "run"
    assert (
        main(prune_args(tiny_model_dir, run, calibration_txt, "--compensate", "--compensate-tokens", "0"))
        == 0
    )
    manifest = json.loads((run / "run.json").read_text())
    assert {"search", "compensate"} <= set(manifest["phases"]) and "extract" not in manifest["phases"]
    saved = json.loads((run / "model-compensated" / "multipruner_plan.json").read_text())
    compensation = saved["meta"]["compensation"]
    assert compensation["branches"] > 0 and 0 < compensation["error_ratio"] < 1
    from safetensors.torch import load_file

    stored = load_file(run / "calibration.safetensors")
    assert (
        compensation["tokens"] == stored["block"].numel() + stored["width"].numel()
    )  # 0: the run's two sets
    plain = tmp_path / "plain"
    out = tmp_path / "compensated"
    assert main(extract_args(tiny_model_dir, run / "plan.json", plain)) == 0
    args = [
        "compensate",
        "--model",
        str(tiny_model_dir),
        "--plan",
        str(run / "plan.json"),
        "--output",
        str(out),
    ]
    assert (
        main([*args, "--calibration-dataset", str(calibration_txt), "--seqlen", "16", "--tokens", "512"]) == 0
    )
    assert "compensated" in capsys.readouterr().out
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    logits = {p: load_pruned(p)[0](ids).logits for p in (plain, out, run / "model-compensated")}
    assert not torch.equal(logits[plain], logits[out])  # the refit changed the narrowed projections
    assert main([*args, "--damping", "-1", "--overwrite"]) == 2
    assert "damping must be 0 or more" in capsys.readouterr().err


# --- removed blocks: a least-squares map folded into the kept projection before them -------------------
def test_fold_for_a_removed_block_equals_direct_lstsq_on_dense_activations(tiny_llama):
    """Layer 1's attention removed: layer 0's down_proj absorbs T = lstsq(M0, Y - R0); nothing earlier changed,
    so the pruned model's layer-0 activations are the dense ones."""
    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=True)
    plan = PruningPlan.dense(prunable.layout).without_block("attention", 1)
    pruned = extract(prunable, plan)
    tokens = _tokens(tiny_llama.config.vocab_size, n=8)
    layers, seen = tiny_llama.model.layers, {}
    hooks = [
        layers[0].post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen.setdefault("r", a[0])),
        layers[0].mlp.register_forward_hook(lambda m, a, out: seen.setdefault("m", out)),
        layers[1].post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen.setdefault("y", a[0])),
    ]
    with torch.no_grad():
        tiny_llama(tokens)
    for h in hooks:
        h.remove()
    d = tiny_llama.config.hidden_size
    m, wanted = seen["m"].reshape(-1, d).double(), (seen["y"] - seen["r"]).reshape(-1, d).double()
    direct = torch.linalg.lstsq(m, wanted).solution
    w_dense = layers[0].mlp.down_proj.weight.double().clone()

    fits = compensate(
        prunable, pruned, plan, tokens, CompensateSettings(damping=0.0, blocks=True), progress=False
    )
    assert len(fits) == 1 and fits[0].layer == 0 and "attention 1" in fits[0].kind
    assert fits[0].error_after < fits[0].error_before
    got = pruned.model.layers[0].mlp.down_proj.weight.double()
    assert torch.allclose(got, direct.T @ w_dense, rtol=1e-4, atol=1e-5)
    assert pruned.model.layers[0].mlp.down_proj.weight.shape == tuple(w_dense.shape)  # no new parameters


def test_folding_spans_and_reload(tiny_llama, token_ids, tmp_path):
    """Consecutive removed branches (mlp 2, then all of layer 3) are one span after the attention before them;
    the saved model keeps its shapes and reloads."""
    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=True)
    plan = _narrow_plan(prunable.layout).without_block("attention", 3).without_block("mlp", 3)
    pruned = extract(prunable, plan)
    shapes = {n: p.shape for n, p in pruned.named_parameters()}
    settings = CompensateSettings(blocks=True)
    fits = compensate(prunable, pruned, plan, _tokens(tiny_llama.config.vocab_size), settings, progress=False)
    folds = [f for f in fits if "stands in" in f.kind]
    assert [(f.layer, f.kind) for f in folds] == [
        (2, "attention (stands in for removed mlp 2, attention 3, mlp 3)")
    ]
    assert all(f.error_after <= f.error_before for f in fits)
    assert {n: p.shape for n, p in pruned.named_parameters()} == shapes
    save_pruned(pruned, None, tmp_path / "comp", plan, prunable.layout)
    reloaded, _ = load_pruned(tmp_path / "comp")
    assert rel_err(reloaded(token_ids).logits, pruned(token_ids).logits) < 1e-6


def test_folding_is_refused_where_branch_outputs_are_normalised(tiny_model):
    prunable = PrunableModel.prepare(tiny_model, weight_reorder=True)
    plan = PruningPlan.dense(prunable.layout).without_block("attention", 1)
    pruned = extract(prunable, plan)
    settings = CompensateSettings(blocks=True)
    if prunable.adapter.branch_outputs_normed:  # Gemma 2 and 3, OLMo 2
        with pytest.raises(CompensationError, match="normalises its attention and mlp output"):
            compensate(
                prunable, pruned, plan, _tokens(tiny_model.config.vocab_size), settings, progress=False
            )
    else:  # every Llama-style family folds
        fits = compensate(
            prunable, pruned, plan, _tokens(tiny_model.config.vocab_size), settings, progress=False
        )
        assert [f.layer for f in fits] == [0]
