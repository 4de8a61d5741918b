"""Calibration and evaluation text sources: turn a *source* into token-id sequences.

A source is either a registered name (``alpaca``, ``wikitext2``, ``ptb``, ``c4``, ``piqa``) or a path to a
local file in the dataset's original format. Named sources prefer the offline copies under
:func:`shared_data_dir` and otherwise go through :func:`datasets.load_dataset`, so that results match the
reference implementation (MultiPruner / BlockPruner / SliceGPT data utilities) byte for byte where the text is
the same. Every failure a user can cause or fix is raised as :class:`DataSourceError` with a message naming
what was tried.

The readers live beside this module: local files in :mod:`multipruner.text_files`, the hub in
:mod:`multipruner.hub_datasets`, the offline folder in :mod:`multipruner.shared_data`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .hub_datasets import hub_column, load_hub_dataset
from .shared_data import shared_data_dir, shared_file
from .text_files import (
    DOC_SEPARATOR,
    FILE_READERS,
    DataSourceError,
    alpaca_split_dataset,
    check_split,
    format_piqa,
    format_records,
    hellaswag_documents,
    parse_records,
    read_line_rows,
    read_text_file,
    wikitext_rows,
)

_SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}

_HUB_WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1")
_HUB_PTB = ("ptb_text_only", "penn_treebank")
_HUB_ALPACA = "tatsu-lab/alpaca"
_HUB_C4 = "allenai/c4"
_C4_SHARDS = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
_LOCAL_FILE_SPLIT = {"test": "test", "validation": "valid"}

# Evaluation split per named source (perplexity is reported on these in the papers).
_EVAL_SPLITS = {"wikitext2": "test", "ptb": "test", "c4": "validation"}


def _normalize_split(split: str) -> str:
    """Accept the usual spellings of the validation split (``valid``, ``val``, ``dev``)."""
    key = split.strip().lower()
    return _SPLIT_ALIASES.get(key, key)


def _require_nonempty(texts: list[str], what: str) -> list[str]:
    """Fail early: an empty calibration set would otherwise surface as an obscure tensor-shape error."""
    if not any(t.strip() for t in texts):
        raise DataSourceError(f"{what} contains no non-empty text")
    return texts


def _read_path(source: str, split: str, text_field: str | None) -> list[str]:
    path = Path(source).expanduser()
    if not path.exists():
        raise DataSourceError(
            f"{source!r} is neither a known source ({', '.join(sorted(_SOURCES))}) nor an existing file"
        )
    name = path.name.lower()
    for suffix, reader in FILE_READERS.items():
        if name.endswith(suffix):
            return reader(path, split, text_field)
    raise DataSourceError(f"unsupported data file type: {path} (supported: {', '.join(FILE_READERS)})")


# ---------------------------------------------------------------------------------------------------------
# Named sources
# ---------------------------------------------------------------------------------------------------------


def _alpaca_source(split: str, text_field: str | None) -> list[str]:
    check_split("alpaca", split, ("train", "test", "validation"))
    hint = "Pass the path of a local copy of the original alpaca_data.json as the source instead."
    dataset = load_hub_dataset(_HUB_ALPACA, split="train", hint=hint)
    return hub_column(alpaca_split_dataset(dataset)[split], text_field or "text", _HUB_ALPACA)


def _wikitext2_source(split: str, text_field: str | None) -> list[str]:
    check_split("wikitext2", split, ("train", "test", "validation"))
    local_split = _LOCAL_FILE_SPLIT.get(split)
    local = shared_file("wikitext2", f"wiki.{local_split}.raw") if local_split else None
    if local is not None:
        return wikitext_rows(read_text_file(local))
    hint = "Pass a local path to wiki.test.raw / wiki.valid.raw, or set MULTIPRUNER_DATA_DIR."
    dataset = load_hub_dataset(_HUB_WIKITEXT[0], name=_HUB_WIKITEXT[1], split=split, hint=hint)
    return hub_column(dataset, text_field or "text", _HUB_WIKITEXT[0])


def _ptb_source(split: str, text_field: str | None) -> list[str]:
    check_split("ptb", split, ("train", "test", "validation"))
    local_split = _LOCAL_FILE_SPLIT.get(split)
    local = shared_file("ptb", f"ptb.{local_split}.txt") if local_split else None
    if local is not None:
        return read_line_rows(local)
    hint = "Set MULTIPRUNER_DATA_DIR to a folder holding ptb/ptb.test.txt and ptb/ptb.valid.txt."
    dataset = load_hub_dataset(_HUB_PTB[0], name=_HUB_PTB[1], split=split, hint=hint)
    return hub_column(dataset, text_field or "sentence", _HUB_PTB[0])


def _c4_source(split: str, text_field: str | None) -> list[str]:
    check_split("c4", split, tuple(_C4_SHARDS))
    hint = "Pass a local path to a c4 shard instead (e.g. c4-validation.00000-of-00008.json.gz)."
    dataset = load_hub_dataset(_HUB_C4, data_files={split: _C4_SHARDS[split]}, split=split, hint=hint)
    return hub_column(dataset, text_field or "text", _HUB_C4)


def _piqa_source(split: str, text_field: str | None) -> list[str]:
    """PIQA from the offline folder only (the hub copy is a loading script that ``datasets`` no longer runs)."""
    del text_field
    check_split("piqa", split, ("test", "validation"))
    filename = "tests.jsonl" if split == "test" else "valid.jsonl"
    local = shared_file("piqa", filename)
    if local is None:
        raise DataSourceError(
            f"PIQA needs the offline file piqa/{filename}, but no shared data folder holds it "
            f"(looked in {shared_data_dir() or 'no shared data folder'}); pass a PIQA *.jsonl path instead"
        )
    records = parse_records(read_text_file(local), local)
    return format_records(records, local, ("goal", "sol1"), format_piqa)


_SOURCES: dict[str, Callable[[str, str | None], list[str]]] = {
    "alpaca": _alpaca_source,
    "wikitext2": _wikitext2_source,
    "ptb": _ptb_source,
    "c4": _c4_source,
    "piqa": _piqa_source,
}


def _hellaswag_text() -> list[str]:
    local = shared_file("hellaswag", "hellaswag_val_full.txt")
    if local is None:
        raise DataSourceError(
            "hellaswag-text needs the offline file hellaswag/hellaswag_val_full.txt, but no shared data folder "
            f"holds it (looked in {shared_data_dir() or 'no shared data folder'}); set MULTIPRUNER_DATA_DIR"
        )
    return hellaswag_documents(local)


# Texts for evaluation only, from domains no calibration source holds (how-to and video captions): a model
# searched on the calibration mix is measured here on text unlike anything it was fitted to.
EVAL_ONLY_TEXTS: dict[str, Callable[[], list[str]]] = {"hellaswag-text": _hellaswag_text}


def load_texts(source: str, *, split: str = "test", text_field: str | None = None) -> list[str]:
    """Return the documents/examples of ``source`` (a registered name or a local file path).

    Row lists follow the Hugging Face datasets the papers used (so joining them reproduces their token
    streams); local files are read in their original formats. See the module docstring for the names.
    """
    split = _normalize_split(split)
    if source.strip().lower() in EVAL_ONLY_TEXTS:
        raise DataSourceError(
            f"{source} is held out for evaluation (out-of-domain perplexity) and never calibrates: "
            f"choose a calibration source from {', '.join(sorted(_SOURCES))} or a file"
        )
    reader = _SOURCES.get(source.strip().lower())
    texts = reader(split, text_field) if reader else _read_path(source, split, text_field)
    return _require_nonempty(texts, f"data source {source!r} (split {split!r})")


def check_local_source(source: str, *, split: str = "test", text_field: str | None = None) -> None:
    """Read a local text file as :func:`load_texts` will, so that a missing, unreadable, non-UTF-8 or empty
    file, or records without the text field, are refused before any model loads. A registered name is
    left to its use: it may come from the hub, and reading it here would fetch it twice."""
    if source.strip().lower() not in _SOURCES:
        load_texts(source, split=split, text_field=text_field)


# ---------------------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------------------


def tokenize(text: str, tokenizer: Any) -> torch.LongTensor:
    """Tokenize one string once (default special tokens), returning 1-D ids."""
    encoded = tokenizer(text, return_tensors="pt")
    return encoded["input_ids"][0].to(torch.long)


def eval_token_stream(source: str, tokenizer: Any) -> torch.LongTensor:
    """Token ids of a perplexity-evaluation text, tokenized once; the caller cuts them into windows.

    ``wikitext2``/``ptb`` use their test rows and ``c4`` its validation shard, joined with ``"\\n\\n"`` as the
    papers do; ``hellaswag-text`` (evaluation only) joins HellaSwag's validation contexts with their gold
    endings likewise; a local ``.txt`` file is used verbatim; other local files have their texts joined
    likewise.
    """
    key = source.strip().lower()
    if key in EVAL_ONLY_TEXTS:
        text = DOC_SEPARATOR.join(EVAL_ONLY_TEXTS[key]())
    elif key in _SOURCES:
        text = DOC_SEPARATOR.join(load_texts(key, split=_EVAL_SPLITS.get(key, "test")))
    elif source.lower().endswith(".txt"):
        text = read_text_file(Path(source).expanduser())
    else:
        text = DOC_SEPARATOR.join(load_texts(source))
    return tokenize(text, tokenizer)
