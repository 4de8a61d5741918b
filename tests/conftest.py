"""Tiny random models, one per adapter and head layout, and the real embedded model (session-scoped)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
# Tool and interpreter output that appears on its own; runs/ is not excluded (a test must not write there).
_UNWATCHED_DIRS = frozenset({".venv", ".git", "__pycache__", ".pytest_cache", ".ruff_cache"})


def _tree_paths(root: str, skip: frozenset[str]) -> set[str]:
    """Every file and directory under ``root``, not descending into unwatched ones or those in ``skip``."""
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d
            for d in dirnames
            if d not in _UNWATCHED_DIRS
            and not d.endswith(".egg-info")
            and os.path.join(dirpath, d) not in skip
        ]
        found.update(os.path.join(dirpath, d) for d in dirnames)
        found.update(os.path.join(dirpath, f) for f in filenames)
    return found


def _dir_entries(path: str) -> set[str]:
    try:
        return {os.path.join(path, name) for name in os.listdir(path)}
    except OSError:
        return set()


@pytest.fixture(autouse=True)
def _no_stray_files(tmp_path_factory):
    """Fail a test that leaves files in the repository tree or the working directory (not its temp dir)."""
    basetemp = str(tmp_path_factory.getbasetemp().resolve())  # created now, so it is never "new"
    root = str(REPO_ROOT)
    cwd = os.path.realpath(os.getcwd())
    watch_cwd = cwd != root and not cwd.startswith(root + os.sep)  # inside the repo: the walk covers it
    skip = frozenset({basetemp})
    before = _tree_paths(root, skip)
    cwd_before = _dir_entries(cwd) if watch_cwd else set()
    yield
    new = _tree_paths(root, skip) - before
    if watch_cwd:
        new |= {p for p in _dir_entries(cwd) - cwd_before if p != basetemp}
    if new:
        pytest.fail(f"test left files outside its temp dir: {sorted(new)[:10]}")


VOCAB = 128


# fmt: off
# Tiny random models, one per family feature the invariant suite must cover: (model class, config class,
# the config's sizes and features). Every model has vocab VOCAB and 256 positions.
_TINY_SPECS = {
    "llama_gqa": (LlamaForCausalLM, LlamaConfig, dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2_mha_bias": (Qwen2ForCausalLM, Qwen2Config, dict(
        hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, tie_word_embeddings=False)),
    "qwen3_qk_norm": (Qwen3ForCausalLM, Qwen3Config, dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16)),
    # head_dim * heads (4 * 32 = 128) != hidden (48); sliding window 6 < test sequence length
    "gemma3_mqa": (Gemma3ForCausalLM, Gemma3TextConfig, dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, sliding_window=6, query_pre_attn_scalar=32,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"])),
    "mistral_gqa": (MistralForCausalLM, MistralConfig, dict(
        hidden_size=64, intermediate_size=80, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=None)),
    # soft-capped attention and logits, alternating sliding-window layers (window 6 < test length)
    "gemma2_softcap": (Gemma2ForCausalLM, Gemma2Config, dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=6, attn_logit_softcapping=20.0,
        final_logit_softcapping=10.0, query_pre_attn_scalar=16)),
    # norms after each branch only, q/k norms over the whole projection
    "olmo2_post_norm": (Olmo2ForCausalLM, Olmo2Config, dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2)),
    # fused qkv_proj and gate_up_proj
    "phi3_fused": (Phi3ForCausalLM, Phi3Config, dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, pad_token_id=0, eos_token_id=2)),
}


def _tiny(name: str):
    model_cls, config_cls, sizes = _TINY_SPECS[name]
    return model_cls(config_cls(vocab_size=VOCAB, max_position_embeddings=256, **sizes))


TINY_MODELS = {name: functools.partial(_tiny, name) for name in _TINY_SPECS}
# fmt: on


def _randomize(model):
    # Random norms and biases too, so a wrong permutation or slice of them cannot go unnoticed.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.5 + (0.0 if "gemma" in type(model).__name__.lower() else 1.0))
    return model.eval()


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request):
    torch.manual_seed(0)
    return _randomize(TINY_MODELS[request.param]())


@pytest.fixture
def tiny_llama():
    torch.manual_seed(0)
    return _randomize(TINY_MODELS["llama_gqa"]())


@pytest.fixture
def token_ids():
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (2, 20))


def load_embedded_or_skip(name: str):
    """An embedded real model (dense, fp32) with its tokenizer; the test skips, with the install command,
    if its package is absent."""
    from multipruner.model_sources import ModelLoadError
    from multipruner.models import load_model

    try:
        return load_model(name)
    except ModelLoadError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M with its tokenizer."""
    return load_embedded_or_skip("smollm2-135m")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


CORPUS = [
    "the quick brown fox jumps over the lazy dog. ",
    "pack my box with five dozen liquor jugs! ",
    "how vexingly quick daft zebras jump; ",
    "sphinx of black quartz, judge my vow. ",
]


def byte_bpe_tokenizer(
    vocab_size: int = 300,
    *,
    corpus: list[str] | None = None,
    bos: str | None = "<s>",
    eos: str | None = "</s>",
    pad: str | None = None,
):
    """A real fast tokenizer trained in-process (byte-level BPE): nothing is downloaded.

    Trained on ``corpus`` as given (default: ``CORPUS * 5``); the special tokens are ``bos``, ``eos`` and
    ``pad`` in that order (``None`` leaves one out), and a BOS token, if any, is prepended to every text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    special = {key: token for key, token in special.items() if token is not None}
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 5 if corpus is None else corpus, trainer=trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def save_tiny_llama(path: Path) -> Path:
    """A tiny dense Llama (GQA) with a tokenizer, saved as a Hugging Face directory."""
    torch.manual_seed(0)
    tokenizer = byte_bpe_tokenizer()
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
    )
    _randomize(model)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_model_dir(tmp_path):
    return save_tiny_llama(tmp_path / "dense")


def write_calibration_txt(path: Path) -> Path:
    """Plain text with blank-line separated documents, enough for a few 16-token sequences."""
    rng = torch.Generator().manual_seed(0)
    docs = []
    for _ in range(40):
        words = [CORPUS[int(i)] for i in torch.randint(0, len(CORPUS), (3,), generator=rng)]
        docs.append("".join(words).strip())
    path.write_text("\n\n".join(docs))
    return path


def extract_args(model_dir, plan, output, *extra) -> list[str]:
    """``extract`` of ``plan`` from the dense model in ``model_dir`` into ``output``."""
    return ["extract", "--model", str(model_dir), "--plan", str(plan), "--output", str(output), *extra]


def prune_args(model_dir, run_dir, calib, *extra, by_tokens: bool = False):
    """``prune`` on the tiny model: 30 %, 16-token sequences, 16/8 reference samples (or 64/32 tokens)."""
    sizes = (
        ["--block-tokens", "64", "--width-tokens", "32"]
        if by_tokens
        else ["--num_calibration_samples_block", "16", "--num_calibration_samples_width", "8"]
    )
    return [
        "prune",
        "--model_path",
        str(model_dir),
        "--output_path",
        str(run_dir),
        "--weight_reorder",
        "--target_ratio",
        "30",
        "--pruning_distribution",
        "40:40:20",
        "--mlp_channel_group_size",
        "24",
        "--attn_channel_group_size",
        "32",
        "--calibration_dataset",
        str(calib),
        *sizes,
        "--seqlen",
        "16",
        *extra,
    ]


@pytest.fixture
def calibration_txt(tmp_path):
    return write_calibration_txt(tmp_path / "calib.txt")
