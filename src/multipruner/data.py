"""Calibration and evaluation text sources: turn a *source* into token-id sequences.

A source is either a registered name (``alpaca``, ``wikitext2``, ``ptb``, ``c4``, ``piqa``) or a path to a
local file in the dataset's original format. Named sources prefer the offline copies under
:func:`shared_data_dir` and otherwise go through :func:`datasets.load_dataset`, so that results match the
reference implementation (MultiPruner / BlockPruner / SliceGPT data utilities) byte for byte where the text is
the same. Every failure a user can cause or fix is raised as :class:`DataSourceError` with a message naming
what was tried.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import UsageError

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n{output}"
)

DOC_SEPARATOR = "\n\n"
"""Separator used to join documents before tokenization (the papers' ``"\\n\\n".join``)."""

_SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}
_TRUTHY = frozenset({"1", "on", "yes", "true"})
DATA_DIR_ENV = "MULTIPRUNER_DATA_DIR"

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


class DataSourceError(UsageError):
    """A text source could not be read; the message names what was tried and how to fix it."""


# ---------------------------------------------------------------------------------------------------------
# Locating the offline data
# ---------------------------------------------------------------------------------------------------------


def shared_data_dir() -> Path | None:
    """Return the offline data folder, or ``None`` when there is none.

    Looked up on every call (no cached state) so that tests and the CLI can redirect it with
    ``$MULTIPRUNER_DATA_DIR``. Without the variable the first existing of ``./shared/data``,
    ``../shared/data`` (relative to the working directory) and ``<repo root>/../shared/data`` is used.
    """
    override = os.environ.get(DATA_DIR_ENV, "").strip()
    if override:
        path = Path(override).expanduser()
        if path.is_dir():
            return path.resolve()
        # An explicit override that does not exist must not silently fall back to another folder.
        logger.warning("MULTIPRUNER_DATA_DIR=%s is not a directory; no offline data is used", override)
        return None
    for candidate in _data_dir_candidates():
        if candidate.is_dir():
            return candidate.resolve()
    return None


def _data_dir_candidates() -> tuple[Path, ...]:
    repo_root = Path(__file__).resolve().parents[2]
    return (Path("shared/data"), Path("../shared/data"), repo_root.parent / "shared" / "data")


def expected_data_dir() -> Path:
    """Where the offline data would be looked for last (for messages when there is none)."""
    override = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(override).expanduser() if override else _data_dir_candidates()[-1]


def shared_file(*parts: str) -> Path | None:
    """Path of a file inside the shared data folder, or ``None`` if the folder or file is missing."""
    root = shared_data_dir()
    if root is None:
        return None
    path = root.joinpath(*parts)
    return path if path.is_file() else None


# ---------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------


def _normalize_split(split: str) -> str:
    """Accept the usual spellings of the validation split (``valid``, ``val``, ``dev``)."""
    key = split.strip().lower()
    return _SPLIT_ALIASES.get(key, key)


def _check_split(source: str, split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise DataSourceError(f"source {source!r} has no split {split!r}; choose one of {', '.join(allowed)}")


def _require_nonempty(texts: list[str], what: str) -> list[str]:
    """Fail early: an empty calibration set would otherwise surface as an obscure tensor-shape error."""
    if not any(t.strip() for t in texts):
        raise DataSourceError(f"{what} contains no non-empty text")
    return texts


def _read_text_file(path: Path) -> str:
    """Read a whole UTF-8 file, with user-facing errors for missing, unreadable or empty files."""
    if not path.exists():
        raise DataSourceError(f"data file not found: {path}")
    if not path.is_file():
        raise DataSourceError(f"data source is not a regular file: {path}")
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DataSourceError(f"could not read data file {path}: {exc}") from exc
    if not text.strip():
        raise DataSourceError(f"data file is empty: {path}")
    return text


def _wikitext_rows(text: str) -> list[str]:
    """Split raw WikiText into the row list of the Hugging Face dataset.

    HF yields one row per line with its newline kept, and blank lines (``" \\n"``) as ``""``; the papers
    join exactly these rows with ``"\\n\\n"``, so perplexities are only comparable with this reconstruction.
    """
    return [line if line.strip() else "" for line in text.splitlines(keepends=True)]


def _format_alpaca(record: dict[str, Any]) -> str:
    """Format one original ``alpaca_data.json`` record as the hub dataset's ``text`` column."""
    template = ALPACA_PROMPT_INPUT if record.get("input") else ALPACA_PROMPT_NO_INPUT
    return template.format(
        instruction=record["instruction"], input=record.get("input", ""), output=record["output"]
    )


def _format_piqa(record: dict[str, Any]) -> str:
    """One PIQA item as instruction-like text: the goal followed by its first solution."""
    return f"{record['goal']}\n{record['sol1']}"


# ---------------------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------------------


def _parse_records(text: str, path: Path) -> list[Any]:
    """Parse a JSON document (list or ``{"data": [...]}``) or JSON lines (c4 ``*.json`` shards are JSONL)."""
    if not path.name.lower().endswith((".jsonl", ".jsonl.gz")):
        try:
            document = json.loads(text)
        except json.JSONDecodeError:
            document = None  # not one JSON document: fall through to JSON lines
        if isinstance(document, list):
            return document
        if isinstance(document, dict) and isinstance(document.get("data"), list):
            return document["data"]
        if document is not None:
            raise DataSourceError(f"{path}: expected a JSON list of records or an object with a 'data' list")
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataSourceError(f"{path}: line {number} is not valid JSON ({exc.msg})") from exc
    return records


def _record_kind(records: list[Any], text_field: str | None) -> str:
    """Detect the original format of a record file when no field was named explicitly."""
    first = records[0] if records else None
    if text_field is not None or not isinstance(first, dict):
        return "field"
    if "instruction" in first and "output" in first:
        return "alpaca"
    if "goal" in first and "sol1" in first:
        return "piqa"
    return "field"


def _apply(records: list[Any], path: Path, fields: tuple[str, ...], fmt: Callable[[dict], str]) -> list[str]:
    """Format every record, naming the record and file when one lacks a required field."""
    texts = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataSourceError(f"{path}: record {index} is not a JSON object")
        missing = [f for f in fields if f not in record]
        if missing:
            raise DataSourceError(
                f"{path}: record {index} has no field {missing[0]!r} (fields present: {sorted(record)})"
            )
        value = fmt(record)
        if not isinstance(value, str):
            raise DataSourceError(f"{path}: record {index} field {fields[0]!r} is not a string")
        texts.append(value)
    return texts


def _read_records_file(path: Path, split: str, text_field: str | None) -> list[str]:
    """Read a .json / .jsonl / .json.gz file: Alpaca, PIQA or generic records with a text field."""
    records = _parse_records(_read_text_file(path), path)
    if not records:
        raise DataSourceError(f"data file has no records: {path}")
    kind = _record_kind(records, text_field)
    if kind == "alpaca":
        _check_split(str(path), split, ("train", "test", "validation"))
        texts = _apply(records, path, ("instruction", "output"), _format_alpaca)
        # The split depends only on the record count and seed, so splitting the formatted texts selects
        # the same examples as splitting the raw records (and avoids Arrow type unification of raw fields).
        return [row["text"] for row in alpaca_split([{"text": t} for t in texts])[split]]
    if kind == "piqa":
        return _apply(records, path, ("goal", "sol1"), _format_piqa)
    field = text_field or "text"
    return _apply(records, path, (field,), lambda record: record[field])


def _read_txt_documents(path: Path, split: str, text_field: str | None) -> list[str]:
    """A plain-text file: documents are separated by blank lines (``"\\n\\n"``), empty pieces dropped."""
    del split, text_field  # a plain file is one collection; there is nothing to select
    return [piece for piece in _read_text_file(path).split(DOC_SEPARATOR) if piece.strip()]


def _read_raw_rows(path: Path, split: str, text_field: str | None) -> list[str]:
    """A WikiText ``*.raw`` file, as the Hugging Face row list."""
    del split, text_field
    return _wikitext_rows(_read_text_file(path))


def _read_line_rows(path: Path) -> list[str]:
    """One sentence per line (PTB); rows are stripped like the hub's ``ptb_text_only`` loader does."""
    return [line.strip() for line in _read_text_file(path).splitlines()]


# Longest suffix first, so ".json.gz" wins over ".gz".
_FILE_READERS: dict[str, Callable[[Path, str, str | None], list[str]]] = {
    ".jsonl.gz": _read_records_file,
    ".json.gz": _read_records_file,
    ".jsonl": _read_records_file,
    ".json": _read_records_file,
    ".txt": _read_txt_documents,
    ".raw": _read_raw_rows,
}


def _read_path(source: str, split: str, text_field: str | None) -> list[str]:
    path = Path(source).expanduser()
    if not path.exists():
        raise DataSourceError(
            f"{source!r} is neither a known source ({', '.join(sorted(_SOURCES))}) nor an existing file"
        )
    name = path.name.lower()
    for suffix, reader in _FILE_READERS.items():
        if name.endswith(suffix):
            return reader(path, split, text_field)
    raise DataSourceError(f"unsupported data file type: {path} (supported: {', '.join(_FILE_READERS)})")


# ---------------------------------------------------------------------------------------------------------
# Hugging Face hub
# ---------------------------------------------------------------------------------------------------------


def offline_variable() -> str | None:
    """Name of the environment variable that declares the machine offline, if any."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUTHY:
            return var
    return None


def _libraries_offline() -> bool:
    """Whether ``datasets``/``huggingface_hub`` themselves run offline (they read the variable at import)."""
    import datasets.config
    import huggingface_hub.constants

    return bool(getattr(datasets.config, "HF_HUB_OFFLINE", False)) and bool(
        huggingface_hub.constants.HF_HUB_OFFLINE
    )


def _hub_error(name: str, detail: str, hint: str) -> DataSourceError:
    return DataSourceError(f"could not load hub dataset {name!r}: {detail}. {hint}")


def _load_hub_dataset(
    path: str, *, split: str, hint: str, name: str | None = None, data_files: dict | None = None
) -> datasets.Dataset:
    """Load one split through :func:`datasets.load_dataset`, turning every failure into DataSourceError.

    When the offline variable was set after ``datasets`` was imported, the libraries would still try the
    network (with retries for tens of seconds), so we fail immediately instead.
    """
    offline_var = offline_variable()
    label = path if name is None else f"{path}/{name}"
    if offline_var and not _libraries_offline():
        raise _hub_error(label, f"the machine is offline ({offline_var}=1) and it is not cached", hint)
    import datasets

    try:
        return datasets.load_dataset(path, name=name, data_files=data_files, split=split)
    except Exception as exc:  # any hub, network or cache failure is a data-source problem for the user
        offline = offline_var or ("HF_HUB_OFFLINE" if _libraries_offline() else None)
        detail = (
            f"the machine is offline ({offline}=1) and it is not cached"
            if offline
            else "the Hugging Face Hub is unreachable or the dataset is unavailable"
        )
        raise _hub_error(label, f"{detail} ({type(exc).__name__}: {exc})", hint) from exc


def _hub_column(dataset: datasets.Dataset, column: str, label: str) -> list[str]:
    if column not in dataset.column_names:
        raise DataSourceError(f"hub dataset {label!r} has no column {column!r} ({dataset.column_names})")
    return list(dataset[column])


# ---------------------------------------------------------------------------------------------------------
# Named sources
# ---------------------------------------------------------------------------------------------------------


def _alpaca_split_dataset(dataset: datasets.Dataset, seed: int = 42) -> dict[str, datasets.Dataset]:
    """The reference's 80/10/10 split (``test`` is the first half of the held-out 20%)."""
    first = dataset.train_test_split(test_size=0.2, seed=seed)
    second = first["test"].train_test_split(test_size=0.5, seed=seed)
    return {"train": first["train"], "test": second["train"], "validation": second["test"]}


def alpaca_split(records: list, seed: int = 42) -> dict[str, list]:
    """Split Alpaca records exactly like the reference, using ``datasets`` itself.

    The split only depends on the number of records and the seed (``datasets`` draws a NumPy permutation),
    so the local ``alpaca_data.json`` and the hub copy give the same calibration examples.
    """
    import datasets

    parts = _alpaca_split_dataset(datasets.Dataset.from_list(list(records)), seed=seed)
    return {key: part.to_list() for key, part in parts.items()}


def _alpaca_source(split: str, text_field: str | None) -> list[str]:
    _check_split("alpaca", split, ("train", "test", "validation"))
    hint = "Pass the path of a local copy of the original alpaca_data.json as the source instead."
    dataset = _load_hub_dataset(_HUB_ALPACA, split="train", hint=hint)
    return _hub_column(_alpaca_split_dataset(dataset)[split], text_field or "text", _HUB_ALPACA)


def _wikitext2_source(split: str, text_field: str | None) -> list[str]:
    _check_split("wikitext2", split, ("train", "test", "validation"))
    local_split = _LOCAL_FILE_SPLIT.get(split)
    local = shared_file("wikitext2", f"wiki.{local_split}.raw") if local_split else None
    if local is not None:
        return _wikitext_rows(_read_text_file(local))
    hint = "Pass a local path to wiki.test.raw / wiki.valid.raw, or set MULTIPRUNER_DATA_DIR."
    dataset = _load_hub_dataset(_HUB_WIKITEXT[0], name=_HUB_WIKITEXT[1], split=split, hint=hint)
    return _hub_column(dataset, text_field or "text", _HUB_WIKITEXT[0])


def _ptb_source(split: str, text_field: str | None) -> list[str]:
    _check_split("ptb", split, ("train", "test", "validation"))
    local_split = _LOCAL_FILE_SPLIT.get(split)
    local = shared_file("ptb", f"ptb.{local_split}.txt") if local_split else None
    if local is not None:
        return _read_line_rows(local)
    hint = "Set MULTIPRUNER_DATA_DIR to a folder holding ptb/ptb.test.txt and ptb/ptb.valid.txt."
    dataset = _load_hub_dataset(_HUB_PTB[0], name=_HUB_PTB[1], split=split, hint=hint)
    return _hub_column(dataset, text_field or "sentence", _HUB_PTB[0])


def _c4_source(split: str, text_field: str | None) -> list[str]:
    _check_split("c4", split, tuple(_C4_SHARDS))
    hint = "Pass a local path to a c4 shard instead (e.g. c4-validation.00000-of-00008.json.gz)."
    dataset = _load_hub_dataset(_HUB_C4, data_files={split: _C4_SHARDS[split]}, split=split, hint=hint)
    return _hub_column(dataset, text_field or "text", _HUB_C4)


def _piqa_source(split: str, text_field: str | None) -> list[str]:
    """PIQA from the offline folder only (the hub copy is a loading script that ``datasets`` no longer runs)."""
    del text_field
    _check_split("piqa", split, ("test", "validation"))
    filename = "tests.jsonl" if split == "test" else "valid.jsonl"
    local = shared_file("piqa", filename)
    if local is None:
        raise DataSourceError(
            f"PIQA needs the offline file piqa/{filename}, but no shared data folder holds it "
            f"(looked in {shared_data_dir() or 'no shared data folder'}); pass a PIQA *.jsonl path instead"
        )
    records = _parse_records(_read_text_file(local), local)
    return _apply(records, local, ("goal", "sol1"), _format_piqa)


_SOURCES: dict[str, Callable[[str, str | None], list[str]]] = {
    "alpaca": _alpaca_source,
    "wikitext2": _wikitext2_source,
    "ptb": _ptb_source,
    "c4": _c4_source,
    "piqa": _piqa_source,
}


def load_texts(source: str, *, split: str = "test", text_field: str | None = None) -> list[str]:
    """Return the documents/examples of ``source`` (a registered name or a local file path).

    Row lists follow the Hugging Face datasets the papers used (so joining them reproduces their token
    streams); local files are read in their original formats. See the module docstring for the names.
    """
    split = _normalize_split(split)
    reader = _SOURCES.get(source.strip().lower())
    texts = reader(split, text_field) if reader else _read_path(source, split, text_field)
    return _require_nonempty(texts, f"data source {source!r} (split {split!r})")


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
    papers do; a local ``.txt`` file is used verbatim; other local files have their texts joined likewise.
    """
    key = source.strip().lower()
    if key in _SOURCES:
        text = DOC_SEPARATOR.join(load_texts(key, split=_EVAL_SPLITS.get(key, "test")))
    elif source.lower().endswith(".txt"):
        text = _read_text_file(Path(source).expanduser())
    else:
        text = DOC_SEPARATOR.join(load_texts(source))
    return tokenize(text, tokenizer)
