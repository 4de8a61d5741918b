"""Local-file readers for the ``mp_*`` lm-eval tasks in this folder.

lm-eval's stock zero-shot tasks read Hugging Face hub datasets. The ``mp_*`` YAMLs next to
this file copy the stock prompt/target/choice/metric definitions verbatim and swap only the
data source: ``custom_dataset`` points at one of the ``load_*`` functions below, which lm-eval
calls as ``load_x(**metadata, **dataset_kwargs)``. multipruner fills ``dataset_kwargs.data_file``
at run time, so no path is baked into a YAML.

Every reader turns a task's *original release format* into the record layout of the hub
dataset the stock task reads (same field names, same types), so the stock Jinja templates
render the very same request strings. The two helpers at the bottom mirror lm-eval's
``hellaswag/utils.py`` and ``winogrande/preprocess_winogrande.py`` (tests check they agree).

This module is loaded by lm-eval from its file path (``!function utils.x``), so it imports
nothing from multipruner.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets

# BoolQ labels appear as strings ("true"/"false", SuperGLUE packaging), bools (original BoolQ
# ``answer``) or 0/1 ints (hub layout); the hub task wants 0 = no, 1 = yes.
_BOOL_WORDS = {"true": 1, "false": 0, "1": 1, "0": 0, "yes": 1, "no": 0}
_WINOGRANDE_ANSWER = {"1": 0, "2": 1}
_HELLASWAG_LINES_PER_ITEM = 6
# OpenBookQA TSV packs the options as "(A) text (B) text ...".
_OBQA_OPTION = re.compile(r"\(([A-Z])\)\s*")
# The lower-case fragment HellaSwag's ctx_b usually is: text after the last sentence end.
_LAST_SENTENCE_START = re.compile(r"[.!?]\s+(?=\S)")


# --------------------------------------------------------------------------- file readers
def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the JSON objects of a JSON-lines file, skipping blank lines."""
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({err})") from err


def _as_dataset(records: list[dict[str, Any]], split: str, path: Path) -> datasets.DatasetDict:
    """Wrap records as the single split lm-eval evaluates (the stock task's eval split)."""
    if not records:
        raise ValueError(f"{path}: no examples found")
    return datasets.DatasetDict({split: datasets.Dataset.from_list(records)})


def _load(data_file: str | None, split: str, to_records: Callable[[Path], list[dict[str, Any]]]):
    """Common entry: validate the path lm-eval passed and convert the file."""
    if not data_file:
        raise ValueError("no data_file given: multipruner sets dataset_kwargs.data_file at run time")
    path = Path(data_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    return _as_dataset(to_records(path), split, path)


# --------------------------------------------------------------------------- PIQA
def _piqa_labels_path(path: Path) -> Path:
    """PIQA releases labels beside the data: ``valid.jsonl`` -> ``valid-labels.lst``."""
    return path.with_name(f"{path.stem}-labels.lst")


def _piqa_records(path: Path, labels_file: str | None = None) -> list[dict[str, Any]]:
    """PIQA release jsonl (+ labels .lst) -> hub layout ``goal, sol1, sol2, label``."""
    rows = list(_read_jsonl(path))
    if all("label" in row for row in rows):
        labels = [int(row["label"]) for row in rows]
    else:
        label_path = Path(labels_file) if labels_file else _piqa_labels_path(path)
        if not label_path.is_file():
            raise FileNotFoundError(
                f"PIQA labels not found: {label_path} (expected beside {path.name}, or a 'label' field)"
            )
        labels = [int(x) for x in label_path.read_text(encoding="utf-8").split()]
    if len(labels) != len(rows):
        raise ValueError(f"{path}: {len(rows)} examples but {len(labels)} labels")
    return [
        {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": lab}
        for r, lab in zip(rows, labels, strict=True)
    ]


def load_piqa(
    data_file: str | None = None, split: str = "validation", labels_file: str | None = None, **_: Any
) -> datasets.DatasetDict:
    """custom_dataset for ``mp_piqa``."""
    return _load(data_file, split, lambda p: _piqa_records(p, labels_file))


# --------------------------------------------------------------------------- ARC / OpenBookQA
def _ai2_record(row: dict[str, Any], question_field: str) -> dict[str, Any]:
    """AI2 jsonl (``question: {stem, choices: [{text, label}]}``) -> hub layout.

    Rows already in the hub layout (question as a string) pass through, so a jsonl export
    of the hub dataset works too.
    """
    question = row.get("question", row.get(question_field))
    if isinstance(question, dict):
        choices = question["choices"]
        return {
            "id": str(row.get("id", "")),
            question_field: question["stem"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            "answerKey": row["answerKey"],
        }
    return {
        "id": str(row.get("id", "")),
        question_field: question,
        "choices": {"text": list(row["choices"]["text"]), "label": list(row["choices"]["label"])},
        "answerKey": row["answerKey"],
    }


def load_arc(data_file: str | None = None, split: str = "test", **_: Any) -> datasets.DatasetDict:
    """custom_dataset for ``mp_arc_easy`` / ``mp_arc_challenge`` (AI2 ARC jsonl)."""
    return _load(data_file, split, lambda p: [_ai2_record(r, "question") for r in _read_jsonl(p)])


def _obqa_tsv_records(path: Path) -> list[dict[str, Any]]:
    """OpenBookQA ``test.tsv`` (ID, Question Stem, Choices, Complete Question, Answer Key)."""
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    records = []
    for row in rows:
        parts = _OBQA_OPTION.split(row["Choices"])[1:]  # [label, text, label, text, ...]
        labels, texts = parts[0::2], [t.strip() for t in parts[1::2]]
        records.append(
            {
                "id": row["ID"],
                "question_stem": row["Question Stem"],
                "choices": {"text": texts, "label": labels},
                "answerKey": row["Answer Key"].strip(),
            }
        )
    return records


def _obqa_records(path: Path) -> list[dict[str, Any]]:
    """OpenBookQA from the TSV packaging or the AI2 jsonl release."""
    if path.suffix.lower() == ".tsv":
        return _obqa_tsv_records(path)
    return [_ai2_record(r, "question_stem") for r in _read_jsonl(path)]


def load_openbookqa(data_file: str | None = None, split: str = "test", **_: Any) -> datasets.DatasetDict:
    """custom_dataset for ``mp_openbookqa``."""
    return _load(data_file, split, _obqa_records)


# --------------------------------------------------------------------------- BoolQ
def _bool_label(value: Any) -> int:
    """Normalise a BoolQ label to the hub's 0 (no) / 1 (yes)."""
    if isinstance(value, bool | int):
        return int(value)
    return _BOOL_WORDS[str(value).strip().lower()]


def _boolq_records(path: Path) -> list[dict[str, Any]]:
    """BoolQ jsonl (SuperGLUE ``label`` or original ``answer``) -> ``question, passage, idx, label``."""
    return [
        {
            "question": r["question"],
            "passage": r["passage"],
            "idx": int(r.get("idx", i)),
            "label": _bool_label(r["label"] if "label" in r else r["answer"]),
        }
        for i, r in enumerate(_read_jsonl(path))
    ]


def load_boolq(data_file: str | None = None, split: str = "validation", **_: Any) -> datasets.DatasetDict:
    """custom_dataset for ``mp_boolq``."""
    return _load(data_file, split, _boolq_records)


# --------------------------------------------------------------------------- WinoGrande
def _winogrande_records(path: Path) -> list[dict[str, Any]]:
    """WinoGrande jsonl (``sentence`` with ``_``, ``option1``, ``option2``, ``answer``)."""
    return [
        {
            "sentence": r["sentence"],
            "option1": r["option1"],
            "option2": r["option2"],
            "answer": str(r["answer"]),
        }
        for r in _read_jsonl(path)
    ]


def load_winogrande(
    data_file: str | None = None, split: str = "validation", **_: Any
) -> datasets.DatasetDict:
    """custom_dataset for ``mp_winogrande``."""
    return _load(data_file, split, _winogrande_records)


def winogrande_doc_to_text(doc: dict[str, Any]) -> int:
    """Mirror of stock ``preprocess_winogrande.doc_to_text``: the gold *context* index
    (partial evaluation: the options are contexts, the sentence tail is the continuation)."""
    return _WINOGRANDE_ANSWER[doc["answer"]]


def winogrande_doc_to_target(doc: dict[str, Any]) -> str:
    """Mirror of stock ``preprocess_winogrande.doc_to_target``: text after the blank."""
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    """Mirror of stock ``preprocess_winogrande.doc_to_choice``: prefix + each option."""
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


# --------------------------------------------------------------------------- HellaSwag
def hellaswag_preprocess(text: str) -> str:
    """Mirror of stock ``hellaswag/utils.preprocess`` (WikiHow bracket artifacts)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _hellaswag_doc(activity_label: str, ctx: str, endings: list[str], label: Any) -> dict[str, Any]:
    """Stock ``process_docs`` output layout (``query``, ``choices``, ``gold``; ``label`` kept)."""
    return {
        "query": hellaswag_preprocess(activity_label + ": " + ctx),
        "choices": [hellaswag_preprocess(e) for e in endings],
        "gold": int(label),
        "label": str(label),
    }


def _hellaswag_jsonl_records(path: Path) -> list[dict[str, Any]]:
    """Original HellaSwag jsonl: exactly stock's ``ctx_a + " " + ctx_b.capitalize()``."""
    return [
        _hellaswag_doc(
            r["activity_label"], r["ctx_a"] + " " + r["ctx_b"].capitalize(), r["endings"], r["label"]
        )
        for r in _read_jsonl(path)
    ]


def hellaswag_restore_ctx_b_case(query: str) -> str:
    """Best-effort redo of stock's ``ctx_b.capitalize()`` on a flattened context.

    The derived text format stores ``activity_label: ctx_a ctx_b`` with the split lost.
    In HellaSwag ``ctx_b`` is (almost always) the lower-case sentence fragment after
    ``ctx_a``'s last full stop, e.g. ``"... on a roof. he"``; stock turns it into ``"He"``.
    So: if the text after the last sentence end starts lower-case, ``capitalize()`` it.
    Items whose ``ctx_b`` is empty or starts upper-case are left as they are, which is
    also what stock produces for them (bar ``capitalize()`` lower-casing the rest).
    """
    label_end = query.find(": ") + 2 if ": " in query else 0
    starts = [m.end() for m in _LAST_SENTENCE_START.finditer(query, label_end)]
    if not starts:
        return query
    head, tail = query[: starts[-1]], query[starts[-1] :]
    return head + tail.capitalize() if tail[:1].islower() else query


def _hellaswag_txt_records(path: Path) -> list[dict[str, Any]]:
    """Derived 6-lines-per-item text: context, gold label, four endings."""
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % _HELLASWAG_LINES_PER_ITEM:
        raise ValueError(f"{path}: {len(lines)} lines is not a multiple of {_HELLASWAG_LINES_PER_ITEM}")
    records = []
    for i in range(0, len(lines), _HELLASWAG_LINES_PER_ITEM):
        ctx, label, *endings = lines[i : i + _HELLASWAG_LINES_PER_ITEM]
        query = hellaswag_restore_ctx_b_case(hellaswag_preprocess(ctx))
        records.append(
            {
                "query": query,
                "choices": [hellaswag_preprocess(e) for e in endings],
                "gold": int(label),
                "label": label.strip(),
            }
        )
    return records


def _hellaswag_records(path: Path) -> list[dict[str, Any]]:
    """Dispatch on format: original ``.jsonl`` or the derived text file."""
    if path.suffix.lower() == ".jsonl":
        return _hellaswag_jsonl_records(path)
    return _hellaswag_txt_records(path)


def load_hellaswag(data_file: str | None = None, split: str = "validation", **_: Any) -> datasets.DatasetDict:
    """custom_dataset for ``mp_hellaswag`` (docs come out already processed)."""
    return _load(data_file, split, _hellaswag_records)
