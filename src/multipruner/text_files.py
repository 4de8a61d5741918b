"""Reading text from local files in their original formats: WikiText ``*.raw``, plain ``*.txt``, PTB
lines, and JSON / JSON-lines records (Alpaca, PIQA, or any records with a text field), gzipped or not.

:class:`DataSourceError`, the refusal of every text source (local, offline or hub), is defined here, in the
lowest of the text modules.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError

if TYPE_CHECKING:
    import datasets

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


class DataSourceError(UsageError):
    """A text source could not be read; the message names what was tried and how to fix it."""


def check_split(source: str, split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise DataSourceError(f"source {source!r} has no split {split!r}; choose one of {', '.join(allowed)}")


def read_text_file(path: Path) -> str:
    """Read a whole UTF-8 file, with user-facing errors for missing, unreadable or empty files."""
    if not path.exists():
        raise DataSourceError(f"data file not found: {path}")
    if not path.is_file():
        raise DataSourceError(f"data source is not a regular file: {path}")
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as exc:
        raise DataSourceError(
            f"data file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from None
    except (OSError, EOFError) as exc:
        raise DataSourceError(f"could not read data file {path}: {exc}") from exc
    if not text.strip():
        raise DataSourceError(f"data file is empty: {path}; give a file that holds text, or another source")
    return text


def wikitext_rows(text: str) -> list[str]:
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


def format_piqa(record: dict[str, Any]) -> str:
    """One PIQA item as instruction-like text: the goal followed by its first solution."""
    return f"{record['goal']}\n{record['sol1']}"


def parse_records(text: str, path: Path) -> list[Any]:
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


def format_records(
    records: list[Any], path: Path, fields: tuple[str, ...], fmt: Callable[[dict], str]
) -> list[str]:
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
    records = parse_records(read_text_file(path), path)
    if not records:
        raise DataSourceError(f"data file has no records: {path}")
    kind = _record_kind(records, text_field)
    if kind == "alpaca":
        check_split(str(path), split, ("train", "test", "validation"))
        texts = format_records(records, path, ("instruction", "output"), _format_alpaca)
        # The split depends only on the record count and seed, so splitting the formatted texts selects
        # the same examples as splitting the raw records (and avoids Arrow type unification of raw fields).
        return [row["text"] for row in alpaca_split([{"text": t} for t in texts])[split]]
    if kind == "piqa":
        return format_records(records, path, ("goal", "sol1"), format_piqa)
    field = text_field or "text"
    return format_records(records, path, (field,), lambda record: record[field])


def _read_txt_documents(path: Path, split: str, text_field: str | None) -> list[str]:
    """A plain-text file: documents are separated by blank lines (``"\\n\\n"``), empty pieces dropped."""
    del split, text_field  # a plain file is one collection; there is nothing to select
    return [piece for piece in read_text_file(path).split(DOC_SEPARATOR) if piece.strip()]


def _read_raw_rows(path: Path, split: str, text_field: str | None) -> list[str]:
    """A WikiText ``*.raw`` file, as the Hugging Face row list."""
    del split, text_field
    return wikitext_rows(read_text_file(path))


def read_line_rows(path: Path) -> list[str]:
    """One sentence per line (PTB); rows are stripped like the hub's ``ptb_text_only`` loader does."""
    return [line.strip() for line in read_text_file(path).splitlines()]


def hellaswag_documents(path: Path) -> list[str]:
    """HellaSwag items in the shared folder's text format (six lines each: ``activity: context``, the gold
    label, four endings) as documents: each context followed by its gold ending."""
    lines = read_text_file(path).splitlines()
    if len(lines) % 6:
        raise DataSourceError(f"{path}: {len(lines)} lines is not a whole number of 6-line HellaSwag items")
    documents = []
    for start in range(0, len(lines), 6):
        context, label, *endings = lines[start : start + 6]
        if label.strip() not in ("0", "1", "2", "3"):
            raise DataSourceError(f"{path}: line {start + 2} should be the gold ending 0-3, got {label!r}")
        documents.append(f"{context} {endings[int(label)]}")
    return documents


# Longest suffix first, so ".json.gz" wins over ".gz".
FILE_READERS: dict[str, Callable[[Path, str, str | None], list[str]]] = {
    ".jsonl.gz": _read_records_file,
    ".json.gz": _read_records_file,
    ".jsonl": _read_records_file,
    ".json": _read_records_file,
    ".txt": _read_txt_documents,
    ".raw": _read_raw_rows,
}


def alpaca_split_dataset(dataset: datasets.Dataset, seed: int = 42) -> dict[str, datasets.Dataset]:
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

    parts = alpaca_split_dataset(datasets.Dataset.from_list(list(records)), seed=seed)
    return {key: part.to_list() for key, part in parts.items()}
