"""Calibration sets: the reference's sample counts, token budgets, mixed sources, and their errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import byte_bpe_tokenizer

from multipruner.data import load_texts
from multipruner.search.calibration import (
    CalibrationSettings,
    SetSize,
    build_calibration_sets,
    draw_tokens,
    resolve_source,
    sample_and_tokenize,
)
from multipruner.shared_data import shared_data_dir
from multipruner.text_files import DataSourceError

WORDS = "the quick brown fox jumps over the lazy dog while five boxing wizards jump quickly".split()


@pytest.fixture(scope="module")
def tokenizer():
    """A real fast tokenizer trained in-process (byte-level BPE, lossless) that prepends a BOS token."""
    corpus = [" ".join(WORDS), "Below is an instruction. ### Response:", "document number 12 of 40\n\n"]
    return byte_bpe_tokenizer(400, corpus=corpus * 5, eos=None)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _bos(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<s>")


def _alpaca_records(n: int) -> list[dict]:
    return [
        {"instruction": f"Task {i}.", "input": f"context {i}" if i % 3 == 0 else "", "output": f"answer {i}"}
        for i in range(n)
    ]


def _documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        f"document {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for i in range(n)
    ]


# --- sampling and tokenization ---------------------------------------------------------------------------


def test_sample_and_tokenize_reference_recipe(tokenizer):
    texts = [f"sample number {i} is about the quick brown fox" for i in range(20)]
    rng = random.Random(7)
    out = sample_and_tokenize(texts, tokenizer, num_samples=6, seqlen=8, rng=rng)
    picked = random.Random(7).sample(range(20), 6)
    ids = tokenizer("\n\n".join(texts[i] for i in picked), return_tensors="pt")["input_ids"][0]
    n = ids.numel() // 8
    assert out.dtype == torch.long and out.shape == (n, 8)
    assert torch.equal(out.flatten(), ids[: n * 8])
    assert out[0, 0].item() == _bos(tokenizer)  # tokenized once with the default special tokens
    everything = sample_and_tokenize(texts, tokenizer, num_samples=None, seqlen=8)
    all_ids = tokenizer("\n\n".join(texts))["input_ids"]
    assert everything.flatten().tolist() == all_ids[: everything.numel()]


def test_sample_and_tokenize_errors(tokenizer):
    with pytest.raises(DataSourceError, match="cannot sample 3 texts: the source has 2"):
        sample_and_tokenize(["a b", "c d"], tokenizer, num_samples=3, seqlen=4)
    with pytest.raises(DataSourceError, match=r"has \d+ tokens but 2000 are needed.*smaller --seqlen"):
        sample_and_tokenize(["short text"], tokenizer, num_samples=1, seqlen=1000, min_sequences=2)


def test_build_calibration_sets_width_then_block(tmp_path, tokenizer):
    docs = [f"document {i}: the lazy dog sleeps while fox {i} jumps" for i in range(30)]
    path = _write(tmp_path / "calib.txt", "\n\n".join(docs))
    sets = build_calibration_sets(
        str(path), tokenizer, block=SetSize(samples=10), width=SetSize(samples=5), seqlen=16, seed=3
    )
    rng = random.Random(3)
    width = sample_and_tokenize(docs, tokenizer, num_samples=5, seqlen=16, rng=rng)
    block = sample_and_tokenize(docs, tokenizer, num_samples=10, seqlen=16, rng=rng)
    assert set(sets) == {"block", "width"}
    assert torch.equal(sets["width"], width) and torch.equal(sets["block"], block)
    swapped = random.Random(3)
    block_first = sample_and_tokenize(docs, tokenizer, num_samples=10, seqlen=16, rng=swapped)
    assert not torch.equal(sets["block"], block_first)


def test_build_calibration_sets_alpaca_uses_test_part(tmp_path, tokenizer):
    records = _alpaca_records(50)
    path = _write(tmp_path / "alpaca_data.json", json.dumps(records))
    sets = build_calibration_sets(
        str(path), tokenizer, block=SetSize(samples=4), width=SetSize(samples=2), seqlen=8
    )
    test_texts = load_texts(str(path), split="test")
    rng = random.Random(42)
    width = sample_and_tokenize(test_texts, tokenizer, num_samples=2, seqlen=8, rng=rng)
    assert torch.equal(sets["width"], width)
    with pytest.raises(DataSourceError, match="the source has 5"):
        build_calibration_sets(
            str(path), tokenizer, block=SetSize(samples=6), width=SetSize(samples=1), seqlen=8
        )


# --- token budgets ---------------------------------------------------------------------------------------


def test_token_budgets_give_exact_sizes_whole_sequences_and_disjoint_sets(tmp_path, tokenizer):
    path = _write(tmp_path / "corpus.txt", "\n\n".join(_documents(300)))
    sets = build_calibration_sets(
        str(path), tokenizer, block=SetSize(tokens=640), width=SetSize(tokens=330), seqlen=32, seed=5
    )
    assert sets["block"].shape == (20, 32) and sets["width"].shape == (10, 32)  # 330 rounds down to 320
    assert sets["block"].dtype == torch.long
    # every row is a slice of the joined text, and no document start is in both sets
    starts = {tuple(row[:8].tolist()) for row in sets["width"]}
    assert not starts & {tuple(row[:8].tolist()) for row in sets["block"]}


def test_token_budgets_are_deterministic_under_a_seed(tmp_path, tokenizer):
    path = _write(tmp_path / "corpus.txt", "\n\n".join(_documents(300)))
    sizes = dict(block=SetSize(tokens=320), width=SetSize(tokens=160), seqlen=32)
    one = build_calibration_sets(str(path), tokenizer, seed=1, **sizes)
    again = build_calibration_sets(str(path), tokenizer, seed=1, **sizes)
    other = build_calibration_sets(str(path), tokenizer, seed=2, **sizes)
    assert all(torch.equal(one[k], again[k]) for k in one)
    assert not torch.equal(one["block"], other["block"])


def test_a_single_text_without_blank_lines_works_with_token_budgets(tmp_path, tokenizer, caplog):
    """The reference's sample counts failed on a user's .txt (one 'sample'); budgets cut its tokens."""
    text = " ".join(random.Random(0).choice(WORDS) for _ in range(800))
    path = _write(tmp_path / "mine.txt", text)
    with pytest.raises(DataSourceError, match="cannot sample 32 texts: the source has 1"):
        build_calibration_sets(
            str(path), tokenizer, block=SetSize(samples=64), width=SetSize(samples=32), seqlen=32
        )
    sets = build_calibration_sets(
        str(path), tokenizer, block=SetSize(tokens=256), width=SetSize(tokens=128), seqlen=32
    )
    assert sets["block"].shape == (8, 32) and sets["width"].shape == (4, 32)
    assert "share text" in caplog.text  # one document cannot fill both sets without reuse


def test_a_source_smaller_than_the_budget_gives_what_it_has_and_warns(tmp_path, tokenizer, caplog):
    path = _write(tmp_path / "small.txt", "\n\n".join(_documents(20)))
    sets = build_calibration_sets(
        str(path), tokenizer, block=SetSize(tokens=100_000), width=SetSize(tokens=64), seqlen=32
    )
    total = tokenizer("\n\n".join(_documents(20)), return_tensors="pt")["input_ids"].numel()
    assert 0 < sets["block"].numel() <= total and sets["block"].shape[1] == 32
    assert "holds only" in caplog.text and "overfit" in caplog.text


def test_sets_drawn_for_another_use_than_ranking_do_not_warn_of_overfitting(tmp_path, tokenizer, caplog):
    """Compensation and recovery draw one budget (draw_tokens): the block set a search with a one-sequence
    width set would draw, token for token, without the warning meant for sets that rank candidates."""
    path = _write(tmp_path / "small.txt", "\n\n".join(_documents(20)))
    sizes = {"block": SetSize(tokens=256), "width": SetSize(tokens=32), "seqlen": 32}
    drawn = draw_tokens(str(path), tokenizer, tokens=256, seqlen=32, seed=42)
    assert "overfit" not in caplog.text
    searched = build_calibration_sets(str(path), tokenizer, **sizes)
    assert "the width calibration set holds only 32 tokens" in caplog.text
    assert torch.equal(drawn, searched["block"])


def test_mixed_sources_fill_equal_shares_and_mix_batches(tmp_path, tokenizer):
    rng = random.Random(0)

    def texts(letters: str) -> str:  # each file has its own alphabet, so a row tells where it came from
        return "\n\n".join(
            " ".join(rng.choice(letters) * rng.randint(1, 3) for _ in range(30)) for _ in range(200)
        )

    a, b = _write(tmp_path / "a.txt", texts("ab")), _write(tmp_path / "b.txt", texts("yz"))
    sets = build_calibration_sets(
        f"{a}+{b}", tokenizer, block=SetSize(tokens=32 * 10), width=SetSize(tokens=32 * 4), seqlen=32, seed=0
    )
    assert sets["block"].shape == (10, 32)
    rows = [set(tokenizer.decode(r, skip_special_tokens=True)) - {" ", "\n"} for r in sets["block"]]
    from_a = [r <= {"a", "b"} for r in rows]
    assert sum(from_a) == 5 and sum(r <= {"y", "z"} for r in rows) == 5  # equal shares
    assert from_a != sorted(from_a, reverse=True)  # shuffled, not all of a then all of b
    with pytest.raises(DataSourceError, match="use token budgets with a mixed source"):
        build_calibration_sets(
            f"{a}+{b}", tokenizer, block=SetSize(samples=2), width=SetSize(samples=2), seqlen=8
        )


def test_source_names_resolve_to_calibration_splits():
    assert resolve_source("wikitext2+ptb") == [("wikitext2", "validation"), ("ptb", "validation")]
    assert resolve_source("alpaca") == [("alpaca", "test")]
    with pytest.raises(DataSourceError, match="empty part"):
        resolve_source("wikitext2++ptb")


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(block_tokens=100, seqlen=512), "--block-tokens 100 is less than one sequence of --seqlen 512"),
        (dict(width_tokens=0), "--width-tokens must be at least 1"),
        (dict(seqlen=1), "--seqlen must be at least 2"),
        (dict(batch_size=0), "--batch-size must be at least 1"),
        (dict(num_calibration_samples_block=0, num_calibration_samples_width=4), "at least 1"),
    ],
)
def test_bad_calibration_settings_fail_without_data(kw, message):
    with pytest.raises(DataSourceError, match=message):
        CalibrationSettings(**kw).validate()


def test_default_calibration_never_uses_an_evaluation_split(tokenizer):
    if shared_data_dir() is None:
        pytest.skip("no shared offline data folder")
    parts = resolve_source("default")
    assert parts == [("wikitext2", "validation"), ("ptb", "validation"), ("piqa", "test")]
    sets = CalibrationSettings(block_tokens=512, width_tokens=256, seqlen=64).build(tokenizer)
    assert sets["block"].shape == (8, 64) and sets["width"].shape == (4, 64)


def test_reference_sample_counts_draw_wikitext_rows_empty_ones_included(tokenizer, tmp_path, monkeypatch):
    """The reference samples row indices over the dataset as it is, so the same seed picks the same rows
    (empty ones too: they add only a separator); dropping empty rows first would shift every pick."""
    lines = []
    for i in range(30):
        lines += [" \n", f" = Section {i} = \n", " \n", f" {' '.join(WORDS[i % 5 : i % 5 + 6])} \n"]
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "wiki.valid.raw").write_text("".join(lines))
    monkeypatch.setenv("MULTIPRUNER_DATA_DIR", str(tmp_path))
    rows = load_texts("wikitext2", split="validation")
    assert len(rows) == 120 and rows.count("") == 60

    sets = build_calibration_sets(
        "wikitext2", tokenizer, block=SetSize(samples=12), width=SetSize(samples=8), seqlen=8, seed=42
    )
    rng = random.Random(42)
    picks = {label: rng.sample(range(len(rows)), n) for label, n in (("width", 8), ("block", 12))}
    assert any(rows[i] == "" for i in picks["width"] + picks["block"])
    for label, indices in picks.items():
        expected = sample_and_tokenize([rows[i] for i in indices], tokenizer, num_samples=None, seqlen=8)
        assert torch.equal(sets[label], expected), label
