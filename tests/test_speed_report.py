"""Speed measurement on tiny random models (the run report is tested in test_report.py)."""

from __future__ import annotations

import json
import math
from dataclasses import fields

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from multipruner.evaluation.model_size import directory_size_mb
from multipruner.evaluation.speed import SpeedResult, measure_side_by_side, measure_speed
from multipruner.evaluation.speed_comparison import compare_speed, format_speed_table

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


def test_side_by_side_alternates_models_on_identical_ids():
    # What makes the comparison fair, checked by recording forward calls (timings are too noisy to test).
    models = {"dense": _llama(3), "pruned": _llama(1)}
    calls: list[tuple[str, torch.Tensor]] = []
    for name, model in models.items():
        model.register_forward_pre_hook(
            lambda _module, _args, kwargs, name=name: calls.append((name, kwargs["input_ids"].clone())),
            with_kwargs=True,
        )
    results = measure_side_by_side(models, batch_size=2, seqlen=16, new_tokens=3, repeats=2, warmup=1)
    rounds = 1 + 2  # warm-up, then the timed repeats
    # Each round: the prefill and the decode's prompt pass of one model, then the other's.
    full = [(name, ids) for name, ids in calls if ids.shape == (2, 16)]
    assert [name for name, _ in full] == ["dense", "dense", "pruned", "pruned"] * rounds
    assert all(torch.equal(ids, full[0][1]) for _, ids in full), "every model sees the same ids"
    # The decode steps after the prompt: greedy, exactly new_tokens - 1 one-token passes per generate.
    steps = [name for name, ids in calls if ids.shape == (2, 1)]
    assert len(calls) == len(full) + len(steps)
    assert steps == (["dense"] * 2 + ["pruned"] * 2) * rounds
    dense, pruned = results["dense"], results["pruned"]
    assert dense.weights_mb > pruned.weights_mb and dense.kv_cache_mb == pytest.approx(3 * pruned.kv_cache_mb)
