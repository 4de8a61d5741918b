"""Fused projections (Phi-3): a model whose q/k/v and gate/up share linears must prune exactly as the same
weights held in separate linears (Llama), so a wrong row range in the fused slicing cannot go unnoticed
(masked == extracted alone would not see it: both would read the same wrong rows)."""

from __future__ import annotations

import json
import random

import torch
from conftest import TINY_MODELS, _randomize, rel_err
from test_surgery import random_plan
from transformers import LlamaConfig, LlamaForCausalLM

from multipruner import PrunableModel, extract


def _as_llama(phi3) -> LlamaForCausalLM:
    """The same network with unfused projections."""
    c = phi3.config
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            max_position_embeddings=c.max_position_embeddings,
            rms_norm_eps=c.rms_norm_eps,
            tie_word_embeddings=c.tie_word_embeddings,
        )
    ).eval()
    q = c.num_attention_heads * c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    state = {}
    for name, tensor in phi3.state_dict().items():
        if name.endswith("qkv_proj.weight"):
            prefix = name.removesuffix("qkv_proj.weight")
            for part, rows in zip(("q_proj", "k_proj", "v_proj"), tensor.split([q, kv, kv]), strict=True):
                state[f"{prefix}{part}.weight"] = rows
        elif name.endswith("gate_up_proj.weight"):
            prefix = name.removesuffix("gate_up_proj.weight")
            state[f"{prefix}gate_proj.weight"], state[f"{prefix}up_proj.weight"] = tensor.chunk(2)
        else:
            state[name] = tensor
    llama.load_state_dict(state, strict=True)
    return llama


def test_fused_family_prunes_exactly_like_the_unfused_one(token_ids):
    torch.manual_seed(0)
    phi3 = _randomize(TINY_MODELS["phi3_fused"]())
    llama = _as_llama(phi3)
    assert rel_err(llama(token_ids).logits, phi3(token_ids).logits) < 1e-5
    fused, unfused = (
        PrunableModel.prepare(phi3, weight_reorder=True),
        PrunableModel.prepare(llama, weight_reorder=True),
    )
    assert rel_err(llama(token_ids).logits, phi3(token_ids).logits) < 1e-5  # the same reordering
    for seed in range(4):
        plan = random_plan(fused.layout, random.Random(seed))
        with fused.trial(plan), unfused.trial(plan):
            masked = phi3(token_ids).logits
            assert rel_err(masked, llama(token_ids).logits) < 1e-5
        assert rel_err(extract(fused, plan)(token_ids).logits, masked) < 1e-5
    assert fused.layout.dense_params() == unfused.layout.dense_params()


def test_every_phase_of_a_run_on_a_fused_model(tmp_path, calibration_txt, token_ids):
    """prune (search, compensate, LoRA on the fused linears, extract) from a saved Phi-3 directory; each
    saved model loads with stock transformers and is the shape its config says."""
    from conftest import byte_bpe_tokenizer, prune_args
    from transformers import AutoModelForCausalLM, Phi3Config, Phi3ForCausalLM

    from multipruner.cli import main
    from multipruner.core.inspect_model import describe_layers

    torch.manual_seed(0)
    tokenizer = byte_bpe_tokenizer()
    config = Phi3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    dense = tmp_path / "dense"
    _randomize(Phi3ForCausalLM(config)).save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    run = tmp_path / "run"
    phases = ["--compensate", "--recover", "--recover-max-steps", "2", "--recover-seqlen", "16"]
    phases += ["--recover-data", str(calibration_txt)]
    assert main(prune_args(dense, run, calibration_txt, *phases)) == 0
    plan = json.loads((run / "plan.json").read_text())
    assert plan  # something was pruned
    adapter_config = json.loads((run / "model-recovered" / "adapter" / "adapter_config.json").read_text())
    assert {"qkv_proj", "gate_up_proj", "o_proj", "down_proj"} == set(adapter_config["target_modules"])
    ids = token_ids % len(tokenizer)
    for name in ("model", "model-compensated", "model-recovered"):
        model = AutoModelForCausalLM.from_pretrained(run / name, trust_remote_code=True).eval()
        assert torch.isfinite(model(ids).logits).all()
        for spec, row in zip(model.config.pruned_structure["layers"], describe_layers(model), strict=True):
            if spec["attention"]:
                assert (row["heads"], row["kv_heads"]) == tuple(spec["attention"].values())
            if spec["mlp"]:
                assert row["mlp_width"] == spec["mlp"]["intermediate_size"]
