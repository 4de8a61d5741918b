"""``--offload disk``: the weights stay mapped from safetensors files, each layer's pages are handed back
after it runs, reordered layers are mapped from shards; the scores and the plan are the in-memory ones."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import prune_args
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from multipruner import PrunableModel
from multipruner.cli import main
from multipruner.core.offload import (
    PageRelease,
    map_layers_from_disk,
    mapped_resident_bytes,
    not_file_backed,
    offload_problem,
)
from multipruner.search.objective import LossSettings
from multipruner.search.scoring import CalibrationScorer
from multipruner.search.settings import SearchSettings
from multipruner.search.stages import block_candidates


def _saved(tiny_model, tmp_path):
    path = tmp_path / "dense"
    tiny_model.save_pretrained(path)
    return path


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _block_step_scores(model, offload=None):
    """A block step's candidate perplexities on the reordered model (``offload`` applied after reordering)."""
    prunable = PrunableModel.prepare(model, weight_reorder=True)
    if offload:
        offload(prunable)
    tokens = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(2))
    scorer = CalibrationScorer(prunable, tokens, LossSettings(batch_size=2))
    candidates = block_candidates(prunable.plan, SearchSettings())
    return scorer.score([c.apply(prunable.plan) for c in candidates], [c.layer for c in candidates]).ppl


def test_offloaded_weights_score_as_in_memory_on_every_family(tiny_model, tmp_path):
    path = _saved(tiny_model, tmp_path)
    in_memory = _block_step_scores(_load(path))
    offloaded = _load(path)
    assert not not_file_backed(offloaded), "transformers maps a safetensors checkpoint of the same dtype"

    def offload(prunable):
        release = PageRelease(prunable.model, prunable.adapter)
        map_layers_from_disk(prunable.model, prunable.adapter, tmp_path / "shards")
        release.refresh()
        assert not not_file_backed(prunable.model)  # the reordered layers too, now from the shards

    assert _block_step_scores(offloaded, offload) == in_memory


def test_each_layer_s_pages_are_handed_back_after_it_runs(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=4096,
    )  # fmt: skip
    path = _saved(LlamaForCausalLM(config), tmp_path)  # ~36 MB of fp32 weights
    ids = torch.randint(0, 4096, (2, 64))
    kept = _load(path)
    with torch.inference_mode():
        kept(input_ids=ids)
    whole = mapped_resident_bytes()
    del kept
    offloaded = _load(path)
    prunable = PrunableModel(offloaded)
    release = PageRelease(offloaded, prunable.adapter)
    with torch.inference_mode():
        offloaded(input_ids=ids)
    after = mapped_resident_bytes()
    layer = sum(p.numel() * 4 for p in prunable.adapter.layers(offloaded)[0].parameters())
    assert whole > 30e6 and after < layer, (whole, after, layer)
    release.remove()


def test_a_model_that_is_not_in_safetensors_or_not_in_the_asked_dtype_is_refused(tmp_path, tiny_llama):
    assert "a GGUF file" in offload_problem("smollm2-135m", torch.float32, gguf=True)
    assert "a GGUF file" in offload_problem(str(tmp_path / "m.gguf"), torch.float32)
    (tmp_path / "empty").mkdir()
    assert "not in safetensors" in offload_problem(str(tmp_path / "empty"), torch.float32)
    path = _saved(tiny_llama.to(torch.bfloat16), tmp_path)
    assert "give --dtype bfloat16" in offload_problem(str(path), torch.float32)
    assert offload_problem(str(path), torch.bfloat16) is None


def test_prune_with_offload_makes_the_in_memory_plan(tiny_model_dir, calibration_txt, tmp_path, capsys):
    reference, offloaded = tmp_path / "in-memory", tmp_path / "offloaded"
    assert main(prune_args(tiny_model_dir, reference, calibration_txt, "--no-report")) == 0
    assert (
        main(prune_args(tiny_model_dir, offloaded, calibration_txt, "--no-report", "--offload", "disk")) == 0
    )
    assert (offloaded / "plan.json").read_text() == (reference / "plan.json").read_text()
    steps = [(r / "steps.jsonl").read_text().splitlines()[1:] for r in (reference, offloaded)]
    assert [json.loads(s)["ppl"] for s in steps[0]] == [json.loads(s)["ppl"] for s in steps[1]]
    assert sorted(p.name for p in (offloaded / "offload").iterdir())[0] == "layer-00000.safetensors"
    # a GGUF source is refused before anything is loaded or written
    capsys.readouterr()
    assert (
        main(["prune", "--model", "smollm2-135m", "--output", str(tmp_path / "g"), "--offload", "disk"]) == 2
    )
    assert "--offload disk maps the model's safetensors files" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_an_unknown_offload_is_refused_by_the_parser(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit):
        main(["prune", "--model", str(tiny_model_dir), "--output", str(tmp_path / "x"), "--offload", "ram"])


def test_offload_under_torchrun_is_refused_before_any_process_waits(
    tiny_model_dir, calibration_txt, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr("multipruner.run.pipeline.world_size", lambda: 2)
    run = tmp_path / "run"
    assert main(prune_args(tiny_model_dir, run, calibration_txt, "--offload", "disk")) == 2
    assert "--offload disk runs in one process for now" in capsys.readouterr().err
    assert not run.exists()
