"""GGUF export checked in llama.cpp itself (llama-cpp-python): each plan shape llama.cpp's deci
architecture handles specially is exported from a tiny model and its logits compared with transformers'."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _TINY_SPECS, _randomize, byte_bpe_tokenizer

from multipruner import PrunableModel, PruningPlan, extract, save_pruned
from multipruner.cli import main
from multipruner.export.gguf import ExportError, export_gguf

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed; install with: pip install llama-cpp-python"
)

# the --no-repack switch of benchmarks/llamacpp_check.py, the one place that knows how to turn it off
_spec = importlib.util.spec_from_file_location(
    "llamacpp_check_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / "llamacpp_check.py"
)
_llamacpp_check = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _llamacpp_check
_spec.loader.exec_module(_llamacpp_check)

SEQ = 24


@pytest.fixture(autouse=True)
def _plain_cpu_weights(monkeypatch):
    """Load models without llama.cpp's extra CPU buffer types (AMX and repacked weights). On CPUs with AMX
    they crash llama.cpp (a segfault in decode) on this file's tiny q8_0 tensors, whatever the export
    wrote; the plain CPU path computes the same logits, and those are what these tests compare."""
    defaults = llama_cpp.llama_model_default_params
    plain = _llamacpp_check.without_extra_buffers(defaults)
    monkeypatch.setattr(llama_cpp.llama.llama_cpp, "llama_model_default_params", plain)


def _tiny(name: str, tokenizer):
    model_cls, config_cls, sizes = _TINY_SPECS[name]
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None)
    config = config_cls(vocab_size=len(tokenizer), max_position_embeddings=512, **(sizes | ids))
    torch.manual_seed(0)
    return _randomize(model_cls(config))


def _plans(layout):
    """The shapes deci treats specially, one per plan."""
    heads, dense, last = layout.heads, PruningPlan.dense(layout), layout.num_layers - 1
    uneven = dense
    for i in range(layout.num_layers):
        uneven = uneven.with_width("attention", i, heads.unit_channels * (1 + i % heads.num_units))
        uneven = uneven.with_width("mlp", i, layout.mlp_width - 8 * i)
    return {
        "dense": dense,
        "attention_free_layer": dense.without_block("attention", 1),
        "mlp_free_layer_keeps_attention": dense.without_block("mlp", 1).without_block("mlp", last),
        "layer0_without_attention": dense.without_block("attention", 0).with_width("mlp", 0, 40),
        "uneven_heads_and_widths": uneven,
        "empty_last_layer": dense.without_block("attention", last).without_block("mlp", last),
    }


def _llama_cpp_logits(path, ids: list[int]) -> np.ndarray:
    # f32 KV cache, so the comparison measures the export and not the cache's rounding
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=1,
        type_k=0, type_v=0,
    )  # fmt: skip
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
    llm.close()
    return logits


def _save_with_tokenizer(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def tokenizer():
    return byte_bpe_tokenizer()


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2_mha_bias", "phi3_fused"])
def test_llama_cpp_computes_what_transformers_computes(family, tokenizer, tmp_path):
    model = _tiny(family, tokenizer)
    prunable = PrunableModel.prepare(model, weight_reorder=True)
    ids = torch.randint(3, len(tokenizer), (1, SEQ), generator=torch.Generator().manual_seed(1))
    for name, plan in _plans(prunable.layout).items():
        pruned = extract(prunable, plan)
        expected = pruned(ids).logits[0].detach().double().numpy()
        directory = save_pruned(pruned, tokenizer, tmp_path / name, plan, prunable.layout)
        path = export_gguf(
            pruned, tmp_path / f"{name}.gguf", outtype="f32", tokenizer=tokenizer, tokenizer_dir=directory
        )
        assert _rel(_llama_cpp_logits(path, ids[0].tolist()), expected) < 1e-4, name


def test_f16_and_q8_0_stay_close(tokenizer, tmp_path):
    model = _tiny("llama_gqa", tokenizer)
    prunable = PrunableModel.prepare(model, weight_reorder=True)
    plan = _plans(prunable.layout)["uneven_heads_and_widths"]
    pruned = extract(prunable, plan)
    directory = save_pruned(pruned, tokenizer, tmp_path / "pruned", plan, prunable.layout)
    ids = torch.randint(3, len(tokenizer), (1, SEQ), generator=torch.Generator().manual_seed(2))
    expected = pruned(ids).logits[0].detach().double().numpy()
    errors = {}
    for outtype in ("f16", "bf16", "q8_0"):
        path = export_gguf(
            pruned,
            tmp_path / f"{outtype}.gguf",
            outtype=outtype,
            tokenizer=tokenizer,
            tokenizer_dir=directory,
        )
        errors[outtype] = _rel(_llama_cpp_logits(path, ids[0].tolist()), expected)
    assert errors["f16"] < 5e-3 and errors["bf16"] < 3e-2 and errors["q8_0"] < 3e-2, errors


def test_export_command_writes_a_file_llama_cpp_loads_and_refuses_to_overwrite(tokenizer, tmp_path, capsys):
    model = _tiny("llama_gqa", tokenizer)
    prunable = PrunableModel.prepare(model, weight_reorder=True)
    plan = PruningPlan.dense(prunable.layout).without_block("attention", 0).without_block("mlp", 2)
    directory = save_pruned(extract(prunable, plan), tokenizer, tmp_path / "pruned", plan, prunable.layout)
    out = tmp_path / "pruned.gguf"
    args = ["export", "--model", str(directory), "--outtype", "f16", "--output", str(out)]
    assert main(args) == 0
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, verbose=False, n_threads=1)
    text = llm("the quick brown", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    llm.close()
    assert isinstance(text, str)
    before = out.read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main([*args, "--overwrite", "--outtype", "q8_0"]) == 0
    assert out.read_bytes() != before


def test_unsupported_cases_fail_before_writing(tokenizer, tmp_path, monkeypatch, capsys):
    gemma = _tiny("gemma3_mqa", tokenizer)
    directory = _save_with_tokenizer(gemma, tokenizer, tmp_path / "gemma")
    with pytest.raises(ExportError, match="gemma.*norms each branch's output"):
        export_gguf(gemma, tmp_path / "g.gguf", tokenizer=tokenizer, tokenizer_dir=directory)
    qwen3 = _tiny("qwen3_qk_norm", tokenizer)
    with pytest.raises(ExportError, match="no tensor for model.layers.0.self_attn.q_norm.weight"):
        export_gguf(qwen3, tmp_path / "q.gguf", tokenizer=tokenizer, tokenizer_dir=directory)
    llama_dir = _save_with_tokenizer(_tiny("llama_gqa", tokenizer), tokenizer, tmp_path / "llama")
    with pytest.raises(SystemExit) as exit_info:  # argparse's own refusal
        main(["export", "--model", str(llama_dir), "--outtype", "q4_k", "--output", str(tmp_path / "x.gguf")])
    assert exit_info.value.code == 2 and "invalid choice: 'q4_k'" in capsys.readouterr().err
    # a failure while writing leaves neither the file nor a temporary
    import gguf

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(
            _tiny("llama_gqa", tokenizer), tmp_path / "l.gguf", tokenizer=tokenizer, tokenizer_dir=llama_dir
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma", "llama"]
    assert json.loads((llama_dir / "config.json").read_text())["model_type"] == "llama"
