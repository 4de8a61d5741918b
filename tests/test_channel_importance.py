"""Channels ordered by their activations (--channel-importance activations): the order is a
function-preserving permutation, it is stored in the plan, and every later step replays it."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from conftest import TINY_MODELS, _randomize, extract_args, prune_args, rel_err
from test_cli import _run_cli
from test_surgery import random_plan

from multipruner import PrunableModel, PruningPlan, extract
from multipruner.cli import main
from multipruner.core.importance import (
    CHANNEL_IMPORTANCE,
    ChannelOrder,
    ChannelOrderError,
    activation_channel_order,
    attention_unit_order,
    mlp_channel_order,
)


def _fresh(name: str):
    torch.manual_seed(0)
    return _randomize(TINY_MODELS[name]())


def _contributions(model, tokens):
    """Brute force: per layer, the norm over all tokens of each MLP channel's and attention unit's
    share of the branch output, from the captured projection inputs."""
    from multipruner.core.adapters import adapter_for

    adapter = adapter_for(model)
    heads = adapter.head_layout(model)
    captured = {}
    hooks = []
    for i, layer in enumerate(adapter.layers(model)):
        for kind, linear in (
            ("mlp", getattr(adapter.mlp_module(layer), adapter.mlp_out_proj)),
            ("attention", getattr(adapter.attention_module(layer), adapter.o_proj)),
        ):
            hooks.append(
                linear.register_forward_pre_hook(
                    lambda m, a, key=(kind, i): captured.setdefault(key, []).append(
                        a[0].reshape(-1, a[0].shape[-1])
                    )
                )
            )
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    out = {}
    for (kind, i), xs in captured.items():
        x = torch.cat(xs).double()
        layer = adapter.layers(model)[i]
        w = (
            getattr(adapter.mlp_module(layer), adapter.mlp_out_proj)
            if kind == "mlp"
            else getattr(adapter.attention_module(layer), adapter.o_proj)
        ).weight.double()
        per_channel = torch.stack([x[:, c].norm() * w[:, c].norm() for c in range(x.shape[1])])
        out[kind, i] = per_channel if kind == "mlp" else per_channel.view(heads.num_units, -1).sum(1)
    return out


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_activation_order_keeps_outputs_and_puts_the_largest_contributions_first(name, token_ids):
    model = _fresh(name)
    before = model(token_ids).logits
    order = activation_channel_order(model, token_ids, batch_size=1)
    expected = _contributions(model, token_ids)
    for i, (mlp, units) in enumerate(zip(order.mlp, order.attention, strict=True)):
        assert list(mlp) == torch.sort(expected["mlp", i], descending=True, stable=True).indices.tolist()
        assert (
            list(units) == torch.sort(expected["attention", i], descending=True, stable=True).indices.tolist()
        )
    prunable = PrunableModel.prepare(model, True, order)
    assert prunable.channel_order is order
    assert rel_err(model(token_ids).logits, before) < 1e-5
    # after the permutation, the contributions come out sorted
    after = _contributions(model, token_ids)
    for scores in after.values():
        assert torch.all(scores[:-1] >= scores[1:] - 1e-9)


@pytest.mark.parametrize("name", ["llama_gqa", "phi3_fused"])
def test_a_plan_with_its_order_extracts_the_same_model_from_a_fresh_dense_copy(name, token_ids, tmp_path):
    model = _fresh(name)
    order = activation_channel_order(model, token_ids)
    prunable = PrunableModel.prepare(model, True, order)
    import random

    plan = PruningPlan(**{**random_plan(prunable.layout, random.Random(3)).__dict__, "channel_order": order})
    with prunable.trial(plan):
        masked = model(token_ids).logits
    plan.save(tmp_path / "plan.json", prunable.layout)
    stored = PruningPlan.from_dict(json.loads((tmp_path / "plan.json").read_text()))
    assert stored.channel_order == order
    replayed = extract(
        PrunableModel.prepare(_fresh(name), stored.weight_reorder, stored.channel_order), stored
    )
    assert rel_err(replayed(token_ids).logits, masked) < 1e-5
    # the L1 order would keep other channels: the order really is replayed, not recomputed
    l1 = extract(PrunableModel.prepare(_fresh(name), True), stored)
    assert rel_err(l1(token_ids).logits, masked) > 1e-3


def test_an_order_for_another_model_is_refused(token_ids):
    model = _fresh("llama_gqa")
    order = activation_channel_order(model, token_ids)
    # a well-formed order of a model with one MLP channel less: refused where it meets this model
    narrower = ChannelOrder(
        order.importance, tuple(tuple(range(len(o) - 1)) for o in order.mlp), order.attention
    )
    with pytest.raises(ChannelOrderError, match="not a permutation of this model's 4 x 96 mlp channels"):
        PrunableModel.prepare(_fresh("llama_gqa"), True, narrower)
    # an order that lists a channel twice is no order for any model: refused when built
    with pytest.raises(ChannelOrderError, match="layer 1 does not list each of the 96 mlp channels"):
        ChannelOrder(
            order.importance, (order.mlp[0], (0, *order.mlp[1][1:]), *order.mlp[2:]), order.attention
        )
    with pytest.raises(ChannelOrderError, match="malformed"):
        ChannelOrder.from_dict({"importance": "activations", "mlp": 3})


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_the_registry_gives_the_permutations_of_the_importance_functions(name):
    """Looking an importance up by name ranks exactly as its function, and reorders the model exactly as
    the reordering it replaced (L1: ``PrunableModel.prepare``; activations: both sets, block set first)."""
    from multipruner.core.adapters import adapter_for

    torch.manual_seed(2)
    sets = {"block": torch.randint(0, 128, (3, 12)), "width": torch.randint(0, 128, (2, 12))}
    model = _fresh(name)
    adapter = adapter_for(model)
    heads = adapter.head_layout(model)

    l1 = CHANNEL_IMPORTANCE["l1"].order(model)
    assert l1.importance == "l1" and not CHANNEL_IMPORTANCE["l1"].needs_calibration
    for layer, mlp, units in zip(adapter.layers(model), l1.mlp, l1.attention, strict=True):
        assert list(mlp) == mlp_channel_order(adapter.mlp_module(layer), adapter).tolist()
        assert list(units) == attention_unit_order(adapter.attention_module(layer), adapter, heads).tolist()
    assert l1.mlp != tuple(tuple(range(len(o))) for o in l1.mlp)  # a real permutation, not the identity
    by_l1 = _fresh(name)
    PrunableModel.prepare(by_l1, True, CHANNEL_IMPORTANCE["l1"].order(by_l1))
    reordered = _fresh(name)
    PrunableModel.prepare(reordered, True)  # no order given: the weights' L1 order
    assert all(
        torch.equal(a, b)
        for a, b in zip(by_l1.state_dict().values(), reordered.state_dict().values(), strict=True)
    )

    activations = CHANNEL_IMPORTANCE["activations"]
    assert activations.needs_calibration
    order = activations.order(model, sets, batch_size=2)
    assert order == activation_channel_order(model, torch.cat([sets["block"], sets["width"]]), batch_size=2)
    assert order != activation_channel_order(model, sets["width"], batch_size=2)


@pytest.mark.parametrize("importance, waits", [("l1", False), ("activations", True)])
def test_the_search_waits_for_calibration_only_for_an_importance_that_reads_it(importance, waits):
    from multipruner.search.settings import SearchSettings

    assert SearchSettings(channel_importance=importance).orders_by_activations is waits
    assert SearchSettings(channel_importance=importance, weight_reorder=False).orders_by_activations is False


def test_prune_by_activations_end_to_end_resumes_and_extracts_the_same_model(
    tiny_model_dir, calibration_txt, tmp_path, capsys
):
    extra = ("--channel-importance", "activations")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(prune_args(tiny_model_dir, whole, calibration_txt, *extra, "--extract")) == 0
    plan = json.loads((whole / "plan.json").read_text())
    assert plan["channel_order"]["importance"] == "activations"
    steps = (whole / "steps.jsonl").read_text().splitlines()
    assert all(
        "channel_order" not in json.loads(s).get("plan", {}) for s in steps
    )  # stored once, not per step
    # killed after step 3, resumed: the same plan and order
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MULTIPRUNER_KILL_AT": "step_done:3"}
    proc = _run_cli(prune_args(tiny_model_dir, killed, calibration_txt, *extra), env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert main(prune_args(tiny_model_dir, killed, calibration_txt, *extra, "--resume", "--extract")) == 0
    assert json.loads((killed / "plan.json").read_text())["channel_order"] == plan["channel_order"]
    assert json.loads((killed / "pruning_config.json").read_text()) == json.loads(
        (whole / "pruning_config.json").read_text()
    )
    # `extract --plan` on the dense model replays the stored order and writes the run's model
    out = tmp_path / "extracted"
    assert main(extract_args(tiny_model_dir, whole / "plan.json", out)) == 0
    from safetensors.torch import load_file

    a, b = load_file(whole / "model" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
