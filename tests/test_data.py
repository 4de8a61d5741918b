"""Tests for multipruner.data: sources in their original formats, reference sampling, user-facing errors."""

from __future__ import annotations

import gzip
import json
import socket
from pathlib import Path

import pytest
import torch
from conftest import byte_bpe_tokenizer

from multipruner.data import eval_token_stream, load_texts
from multipruner.shared_data import shared_data_dir
from multipruner.text_files import (
    ALPACA_PROMPT_INPUT,
    ALPACA_PROMPT_NO_INPUT,
    DataSourceError,
    alpaca_split,
    hellaswag_documents,
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "Below is an instruction that describes a task. ### Response:",
    "pack my box with five dozen liquor jugs\n\n",
    " = Robert Boulter = \n",
]


@pytest.fixture(scope="module")
def tokenizer():
    """A real fast tokenizer trained in-process (byte-level BPE, lossless) that prepends a BOS token."""
    return byte_bpe_tokenizer(400, corpus=CORPUS * 5, eos=None)


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every attempt to resolve or connect, so tests prove nothing goes online."""
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def _alpaca_records(n: int) -> list[dict]:
    return [
        {"instruction": f"Task {i}.", "input": f"context {i}" if i % 3 == 0 else "", "output": f"answer {i}"}
        for i in range(n)
    ]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _bos(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<s>")


# --- shared_data_dir -------------------------------------------------------------------------------------


def test_shared_data_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("MULTIPRUNER_DATA_DIR", str(tmp_path))
    assert shared_data_dir() == tmp_path.resolve()
    monkeypatch.setenv("MULTIPRUNER_DATA_DIR", str(tmp_path / "missing"))
    assert shared_data_dir() is None


def test_shared_data_dir_prefers_cwd(monkeypatch, tmp_path):
    monkeypatch.delenv("MULTIPRUNER_DATA_DIR", raising=False)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert shared_data_dir() == (tmp_path / "shared" / "data").resolve()


# --- local files in their original formats ---------------------------------------------------------------


def test_alpaca_json_formatting_and_split(tmp_path):
    records = _alpaca_records(50)
    path = _write(tmp_path / "alpaca_data.json", json.dumps(records, indent=4))
    expected = {
        split: [
            (ALPACA_PROMPT_INPUT if r["input"] else ALPACA_PROMPT_NO_INPUT).format(**r)
            for r in alpaca_split(records)[split]
        ]
        for split in ("train", "test", "validation")
    }
    for split, texts in expected.items():
        assert load_texts(str(path), split=split) == texts
    assert load_texts(str(path), split="valid") == expected["validation"]
    with_input = next(t for t in expected["test"] if "### Input:" in t)
    index = int(with_input.split("Task ")[1].split(".")[0])
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        f"### Instruction:\nTask {index}.\n\n### Input:\ncontext {index}\n\n### Response:\nanswer {index}"
    )
    without = next(t for t in expected["test"] if "### Input:" not in t)
    index = int(without.split("Task ")[1].split(".")[0])
    assert without == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        f"request.\n\n### Instruction:\nTask {index}.\n\n### Response:\nanswer {index}"
    )


def test_alpaca_split_matches_datasets_reference():
    import datasets

    records = _alpaca_records(50)
    parts = alpaca_split(records)
    assert {k: len(v) for k, v in parts.items()} == {"train": 40, "test": 5, "validation": 5}
    ds = datasets.Dataset.from_list(records)
    s = ds.train_test_split(test_size=0.2, seed=42)
    tmp = s["test"].train_test_split(test_size=0.5, seed=42)
    assert parts["train"] == s["train"].to_list()
    assert parts["test"] == tmp["train"].to_list()
    assert parts["validation"] == tmp["test"].to_list()
    assert alpaca_split(records) == parts  # deterministic
    ids = sorted(r["instruction"] for part in parts.values() for r in part)
    assert ids == sorted(r["instruction"] for r in records)  # a partition
    assert alpaca_split(records, seed=0) != parts


def test_c4_json_gz_and_jsonl(tmp_path):
    rows = [
        {"text": "first c4 document.\nsecond line", "timestamp": "2019", "url": "u1"},
        {"text": "doc two"},
    ]
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    gz = tmp_path / "c4-validation.00000-of-00008.json.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as handle:
        handle.write(lines)
    expected = [r["text"] for r in rows]
    assert load_texts(str(gz)) == expected
    assert load_texts(str(_write(tmp_path / "c4-validation.json", lines))) == expected  # gunzipped shard
    assert load_texts(str(_write(tmp_path / "c4.jsonl", lines))) == expected


def test_txt_documents_split_on_blank_lines(tmp_path):
    path = _write(tmp_path / "notes.txt", "doc one\nline two\n\n\n\ndoc two\n\n  \n\ndoc three")
    assert load_texts(str(path)) == ["doc one\nline two", "doc two", "doc three"]


def test_jsonl_custom_field_and_json_data_wrapper(tmp_path):
    path = _write(tmp_path / "custom.jsonl", '{"body": "alpha", "id": 1}\n\n{"body": "beta", "id": 2}\n')
    assert load_texts(str(path), text_field="body") == ["alpha", "beta"]
    wrapped = _write(tmp_path / "wrapped.json", json.dumps({"data": [{"text": "x"}, {"text": "y"}]}))
    assert load_texts(str(wrapped)) == ["x", "y"]


def test_piqa_jsonl_detected(tmp_path):
    rec = {"goal": "open a jar", "sol1": "twist the lid", "sol2": "hit it"}
    path = _write(tmp_path / "mine.jsonl", json.dumps(rec) + "\n")
    assert load_texts(str(path)) == ["open a jar\ntwist the lid"]


# --- errors ----------------------------------------------------------------------------------------------


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataSourceError, match="nor an existing file"):
        load_texts(str(tmp_path / "absent.jsonl"))
    empty = _write(tmp_path / "empty.txt", "  \n\n")
    with pytest.raises(DataSourceError, match="empty.txt"):
        load_texts(str(empty))
    blank_rows = _write(tmp_path / "blank.jsonl", '{"text": ""}\n{"text": "  "}\n')
    with pytest.raises(DataSourceError, match="no non-empty text"):
        load_texts(str(blank_rows))
    with pytest.raises(DataSourceError, match="unsupported data file type"):
        load_texts(str(_write(tmp_path / "table.csv", "a,b\n")))
    with pytest.raises(DataSourceError, match="data file is empty"):
        eval_token_stream(str(empty), tokenizer=None)


def test_missing_field_names_field_and_file(tmp_path):
    path = _write(tmp_path / "records.jsonl", '{"text": "ok"}\n{"content": "no text field"}\n')
    with pytest.raises(DataSourceError, match=r"records\.jsonl: record 1 has no field 'text'"):
        load_texts(str(path))
    with pytest.raises(DataSourceError, match="no field 'body'"):
        load_texts(str(path), text_field="body")
    bad = _write(
        tmp_path / "alpaca_data.json", json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    )
    with pytest.raises(DataSourceError, match="has no field 'output'"):
        load_texts(str(bad))


def test_hub_sources_fail_fast_offline(monkeypatch, no_network):
    """Offline, a hub source is refused at once: when the variable was set after the libraries were imported
    (so they would still try the network, with retries) ``datasets`` is not even called; when they honour
    it, it is called once and its failure is reported as the machine being offline."""
    import datasets
    import datasets.config
    import huggingface_hub.constants

    calls: list[str] = []

    def load_dataset(path, **kwargs):  # what datasets does offline for an uncached dataset
        calls.append(path)
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for lib_offline in (False, True):  # variable unseen by the libraries / honoured by them
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", lib_offline)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", lib_offline)
        for source, split, name in (
            ("alpaca", "test", "tatsu-lab/alpaca"),
            ("c4", "validation", "allenai/c4"),
        ):
            calls.clear()
            with pytest.raises(DataSourceError, match="offline") as info:
                load_texts(source, split=split)
            assert calls == ([name] if lib_offline else [])
            assert name in str(info.value) and "local" in str(info.value)
    assert no_network == []


def test_unknown_split():
    with pytest.raises(DataSourceError, match="no split 'bogus'"):
        load_texts("wikitext2", split="bogus")


# --- shared offline data ---------------------------------------------------------------------------------


@pytest.fixture
def shared():
    root = shared_data_dir()
    if root is None:
        pytest.skip("no shared offline data folder")
    return root


def test_wikitext2_rows_match_hf(shared):
    rows = load_texts("wikitext2", split="test")
    assert len(rows) == 4358
    assert rows[0] == ""  # line 1 is a single space, which HF turns into an empty row
    assert rows[1] == " = Robert Boulter = \n"
    assert rows.count("") == 1467
    raw = (shared / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    assert "".join(r if r else " \n" for r in rows) == raw
    assert len(load_texts("wikitext2", split="validation")) == 3760


def test_eval_token_stream_wikitext2_joins_rows(shared, tokenizer):
    stream = eval_token_stream("wikitext2", tokenizer)
    joined = "\n\n".join(load_texts("wikitext2", split="test"))
    assert stream.dim() == 1 and stream.dtype == torch.long
    assert stream.tolist() == tokenizer(joined)["input_ids"]
    assert tokenizer.decode(stream[1:21]) == joined[: len(tokenizer.decode(stream[1:21]))]


def test_ptb_and_piqa_shared(shared, tokenizer):
    ptb = load_texts("ptb", split="test")
    assert len(ptb) == 3761 and ptb[0] == "no it was n't black monday"
    assert len(load_texts("ptb", split="validation")) == 3370
    piqa = load_texts("piqa", split="test")
    assert len(piqa) == 3084
    assert piqa[0] == "how do you puncture a vein?\nhit it at the wrong angle and make it bleed."
    assert len(load_texts("piqa", split="validation")) == 1838


def test_eval_txt_is_verbatim(tmp_path, tokenizer):
    text = "para one\n\npara two\n"
    stream = eval_token_stream(str(_write(tmp_path / "eval.txt", text)), tokenizer)
    assert stream.tolist() == tokenizer(text)["input_ids"]


# --- out-of-domain evaluation text -----------------------------------------------------------------------


def test_hellaswag_documents_are_contexts_with_their_gold_endings(tmp_path):
    item = ["Cooking: A man cracks eggs. he", "2", "flies.", "sings.", "whisks them.", "sleeps."]
    other = ["Sports: A girl runs. she", "0", "jumps.", "sits.", "eats.", "reads."]
    path = _write(tmp_path / "hs.txt", "\n".join(item + other) + "\n")
    assert hellaswag_documents(path) == [
        "Cooking: A man cracks eggs. he whisks them.",
        "Sports: A girl runs. she jumps.",
    ]
    with pytest.raises(DataSourceError, match="6-line"):
        hellaswag_documents(_write(tmp_path / "cut.txt", "\n".join(item[:5]) + "\n"))
    with pytest.raises(DataSourceError, match="gold ending"):
        hellaswag_documents(_write(tmp_path / "bad.txt", "\n".join([item[0], "x", *item[2:]]) + "\n"))


def test_hellaswag_text_evaluates_and_never_calibrates(shared, tokenizer):
    documents = hellaswag_documents(shared / "hellaswag" / "hellaswag_val_full.txt")
    assert len(documents) == 10042
    assert (
        documents[0]
        == "Roof shingle removal: A man is sitting on a roof. he starts pulling up roofing on a roof."
    )
    stream = eval_token_stream("hellaswag-text", tokenizer)
    assert stream.tolist() == tokenizer("\n\n".join(documents))["input_ids"]
    with pytest.raises(DataSourceError, match="held out for evaluation"):
        load_texts("hellaswag-text")
