"""Zero-shot evaluation through lm-eval on local files: prompts match stock tasks, runs offline.

Uses a tiny random Llama and a tokenizer trained in-test, so nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import byte_bpe_tokenizer

from multipruner.evaluation import zeroshot as zs
from multipruner.evaluation.results import PAPER_TASKS, EvalMeta, EvalResult
from multipruner.evaluation.zeroshot import (
    SUPPORTED_TASKS,
    TaskDataError,
    build_tasks,
    evaluate_zero_shot,
    resolve_task_files,
)

DATA_DIR = zs.default_data_dir()
needs_data = pytest.mark.skipif(
    not (DATA_DIR / "piqa" / "valid.jsonl").is_file(), reason="shared data absent"
)

# Stock YAML of each task inside the installed lm_eval package.
STOCK_YAML = {
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}
MIRRORED_KEYS = (
    "output_type",
    "doc_to_text",
    "doc_to_target",
    "doc_to_choice",
    "metric_list",
    "should_decontaminate",
    "doc_to_decontamination_query",
)

WINOGRANDE_ROWS = [
    {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
     "option1": "Sarah", "option2": "Maria", "answer": "1"},
    {"sentence": "The trophy doesn't fit into the brown suitcase because the _ is too large.",
     "option1": "trophy", "option2": "suitcase", "answer": "1"},
    {"sentence": "I poured water from the bottle into the cup until the _ was full.",
     "option1": "bottle", "option2": "cup", "answer": "2"},
    {"sentence": "Kyle asked Ian for help because _ knew the answer.",
     "option1": "Kyle", "option2": "Ian", "answer": "2"},
]  # fmt: skip

# The first three items of the original HellaSwag validation jsonl (rowanz/hellaswag), i.e. the
# source of the first three items of the derived text file in the shared data.
HELLASWAG_RAW = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "label": 3, "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                             "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {"ind": 92, "activity_label": "Clean and jerk",
     "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.", "ctx_b": "the lady",
     "label": 3, "endings": ["swings and lands in her arms.", "pulls the barbell forward.",
                             "pulls a rope attached to the barbell.", "stands and lifts the weight over her head."]},
    {"ind": 106, "activity_label": "Canoeing",
     "ctx_a": "Two women in a child are shown in a canoe while a man pulls the canoe while standing in the "
              "water, with other individuals visible in the background.",
     "ctx_b": "the child and a different man", "label": 2,
     "endings": ["are then shown paddling down a river in a boat while a woman talks.",
                 "are driving the canoe, they go down the river flowing side to side.",
                 "sit in a canoe while the man paddles.",
                 "walking go down the rapids, while the man in his helicopter almost falls and goes out of "
                 "canoehood."]},
]  # fmt: skip


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs as on a machine without hub access."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def winogrande_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("wg") / "dev.jsonl", WINOGRANDE_ROWS)


@pytest.fixture(scope="module")
def overrides(winogrande_file: Path) -> dict[str, Path]:
    """Files for the two tasks whose evaluation split is not in the shared data."""
    return {"winogrande": winogrande_file, "arc_challenge": DATA_DIR / "arc" / "ARC-Challenge-Dev.jsonl"}


@pytest.fixture(scope="module")
def tiny_lm() -> tuple[Any, Any]:
    """Random 2-layer Llama + byte-level BPE tokenizer trained here: no downloads."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_bpe_tokenizer(
        400,
        corpus=["Question: what is it?\nAnswer: a man is sitting on a roof."] * 20,
        bos=None,
        eos="<eos>",
        pad="<pad>",
    )

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


# --------------------------------------------------------------------------- resolution / errors
def test_supported_tasks() -> None:
    assert set(PAPER_TASKS) <= set(SUPPORTED_TASKS)
    assert set(SUPPORTED_TASKS) == set(STOCK_YAML)


def test_unknown_task_raises() -> None:
    with pytest.raises(TaskDataError, match="unknown task.*supported tasks: piqa"):
        resolve_task_files(["piqa", "mmlu"])
    with pytest.raises(TaskDataError, match="unknown"):
        resolve_task_files(["piqa"], overrides={"nope": "x.jsonl"})


def test_missing_file_offline_raises(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError) as info:
        resolve_task_files(["winogrande"], data_dir=tmp_path)
    message = str(info.value)
    assert "'winogrande'" in message
    assert str(tmp_path / "winogrande" / "dev.jsonl") in message
    assert "overrides=" in message


def test_missing_override_raises(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match="piqa.*does not exist"):
        resolve_task_files(["piqa"], overrides={"piqa": tmp_path / "missing.jsonl"})


def test_missing_file_online_uses_stock_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    assert resolve_task_files("winogrande,piqa", data_dir=tmp_path) == {"winogrande": None, "piqa": None}


def test_data_dir_env_and_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, winogrande_file: Path
) -> None:
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "val.jsonl").write_text("{}\n")
    monkeypatch.setenv(zs.DATA_DIR_ENV, str(tmp_path))
    files = resolve_task_files(["boolq", "winogrande"], overrides={"winogrande": str(winogrande_file)})
    assert files == {"boolq": tmp_path / "boolq" / "val.jsonl", "winogrande": winogrande_file.resolve()}


def test_piqa_without_labels_raises(tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}])
    with pytest.raises(TaskDataError, match="piqa.*labels"):
        build_tasks(resolve_task_files(["piqa"], overrides={"piqa": data}))


# --------------------------------------------------------------------------- mirrors the stock tasks
def _stock_config(task: str, resolve_func: bool) -> dict[str, Any]:
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(Path(lm_eval.tasks.__file__).parent / STOCK_YAML[task], resolve_func=resolve_func)


def _eval_split(cfg: dict[str, Any]) -> str:
    return cfg.get("test_split") or cfg["validation_split"]


@pytest.mark.parametrize("task", [t for t in SUPPORTED_TASKS if t != "winogrande"])
def test_yaml_definitions_equal_stock(task: str) -> None:
    """Templates, choices, targets and metrics are the stock strings, verbatim."""
    ours = zs.local_task_config(task, "unused.jsonl")
    stock = _stock_config(task, resolve_func=False)
    for key in MIRRORED_KEYS:
        assert ours.get(key) == stock.get(key), key
    assert _eval_split(ours) == _eval_split(stock)
    assert ours["task_alias"] == task


def test_winogrande_functions_equal_stock() -> None:
    ours = zs.local_task_config("winogrande", "unused.jsonl")
    stock = _stock_config("winogrande", resolve_func=True)
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        assert [ours[key](d) for d in WINOGRANDE_ROWS] == [stock[key](d) for d in WINOGRANDE_ROWS], key
    for key in ("output_type", "metric_list", "doc_to_decontamination_query"):
        assert ours[key] == stock[key]


def test_hellaswag_preprocess_equals_stock() -> None:
    stock = _stock_config("hellaswag", resolve_func=True)["process_docs"].__globals__["preprocess"]
    ours = zs.local_task_config("hellaswag", "x")["custom_dataset"].__globals__["hellaswag_preprocess"]
    text = "[header] How to fold a chair [title] Wipe the tray.  [step] Clean it [substeps] now. "
    assert ours(text) == stock(text)


def _requests(task: Any, limit: int) -> list[tuple]:
    """(context, continuation) of every request, plus the gold index of its doc."""
    task.set_config(key="num_fewshot", value=0)
    task.build_all_requests(limit=limit)
    return [(*inst.arguments, task.doc_to_target(inst.doc)) for inst in task.instances]


def _stock_task_on(task: str, dataset: Any) -> Any:
    """The stock task config, fed ``dataset`` instead of its hub dataset."""
    from lm_eval.api.task import ConfigurableTask

    cfg = _stock_config(task, resolve_func=True)
    split_key = "test_split" if cfg.get("test_split") else "validation_split"
    for key in ("training_split", "validation_split", "test_split"):
        cfg[key] = cfg[key] if key == split_key else None
    cfg.pop("tag", None)
    cfg["custom_dataset"] = lambda **_: dataset
    return ConfigurableTask(config=cfg)


@needs_data
@pytest.mark.parametrize("task", [t for t in SUPPORTED_TASKS if t != "hellaswag"])
def test_requests_equal_stock(task: str, overrides: dict[str, Path]) -> None:
    """Same docs through our task and through the stock config give identical requests."""
    ours = build_tasks(resolve_task_files([task], overrides=overrides))[task]
    stock = _stock_task_on(task, ours.dataset)
    assert _requests(ours, 5) == _requests(stock, 5)


@needs_data
def test_hellaswag_requests_equal_stock(tmp_path: Path) -> None:
    """Original jsonl: exact. Derived text: ctx_b capitalisation restored on the first items."""
    import datasets

    raw = datasets.DatasetDict({"validation": datasets.Dataset.from_list(HELLASWAG_RAW)})
    stock = _requests(_stock_task_on("hellaswag", raw), 3)
    jsonl = _write_jsonl(tmp_path / "hellaswag_val.jsonl", HELLASWAG_RAW)
    from_jsonl = build_tasks(resolve_task_files(["hellaswag"], overrides={"hellaswag": jsonl}))["hellaswag"]
    from_txt = build_tasks(resolve_task_files(["hellaswag"]))["hellaswag"]
    assert _requests(from_jsonl, 3) == stock
    assert _requests(from_txt, 3) == stock
    assert stock[0][0] == "Roof shingle removal: A man is sitting on a roof. He"


@needs_data
def test_first_docs_follow_stock_formulas(overrides: dict[str, Path]) -> None:
    """Request strings from the raw files, spelled out with the stock formulas."""
    built = build_tasks(resolve_task_files(["piqa", "arc_easy", "boolq", "openbookqa"], overrides=overrides))
    piqa = json.loads((DATA_DIR / "piqa" / "valid.jsonl").read_text().splitlines()[0])
    piqa_label = int((DATA_DIR / "piqa" / "valid-labels.lst").read_text().split()[0])
    arc = json.loads((DATA_DIR / "arc" / "ARC-Easy-Test.jsonl").read_text().splitlines()[0])
    boolq = json.loads((DATA_DIR / "boolq" / "val.jsonl").read_text().splitlines()[0])
    expected = {
        "piqa": (f"Question: {piqa['goal']}\nAnswer:", [piqa["sol1"], piqa["sol2"]], piqa_label),
        "arc_easy": (
            f"Question: {arc['question']['stem']}\nAnswer:",
            [c["text"] for c in arc["question"]["choices"]],
            [c["label"] for c in arc["question"]["choices"]].index(arc["answerKey"]),
        ),
        "boolq": (
            f"{boolq['passage']}\nQuestion: {boolq['question']}?\nAnswer:",
            ["no", "yes"],
            {"false": 0, "true": 1}[boolq["label"]],
        ),
        "openbookqa": (
            "A person wants to start saving money so that they can afford a nice vacation at the end of the "
            "year. After looking over their budget and expenses, they decide the best way to save money is to",
            [
                "make more phone calls",
                "quit eating lunch out",
                "buy less with monopoly money",
                "have lunch with friends",
            ],
            1,
        ),
    }
    for name, (text, choices, target) in expected.items():
        task = built[name]
        doc = task.eval_docs[0]
        assert (task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc)) == (
            text,
            choices,
            target,
        )
    # multiple_choice requests are (context, target_delimiter + choice)
    text, choices, target = expected["piqa"]
    assert _requests(built["piqa"], 1) == [(text, " " + c, target) for c in choices]


# --------------------------------------------------------------------------- end to end
@needs_data
def test_evaluate_zero_shot_all_tasks(tiny_lm: tuple[Any, Any], overrides: dict[str, Path]) -> None:
    model, tokenizer = tiny_lm
    limit = 4
    out = evaluate_zero_shot(
        model, tokenizer, SUPPORTED_TASKS, limit=limit, batch_size=8, overrides=overrides
    )
    assert list(out) == list(SUPPORTED_TASKS)
    for name, metrics in out.items():
        has_norm = name not in ("winogrande", "boolq")  # stock tasks report acc only
        assert set(metrics) == ({"acc", "acc_norm"} if has_norm else {"acc"}), name
        for metric in metrics.values():
            assert metric.n == limit, name
            assert 0.0 <= metric.value <= 1.0, name
            # lm-eval's standard error of a mean of 0/1 outcomes over `limit` examples
            p = metric.value
            assert metric.stderr == pytest.approx((p * (1 - p) / (limit - 1)) ** 0.5, abs=1e-9), name
    result = EvalResult(EvalMeta(params=1), out)
    expected_avg = sum(result.headline(t)[1].value for t in PAPER_TASKS) / len(PAPER_TASKS)
    assert result.paper_average() == pytest.approx(expected_avg)


@needs_data
def test_paper_avg_none_without_all_paper_tasks(tiny_lm: tuple[Any, Any]) -> None:
    model, tokenizer = tiny_lm
    out = evaluate_zero_shot(model, tokenizer, "piqa", limit=3, batch_size=4)
    assert EvalResult(EvalMeta(params=1), out).paper_average() is None
    assert out["piqa"]["acc"].n == 3


def test_answer_counts_match_the_labels_and_the_accuracy(tiny_lm: tuple[Any, Any], tmp_path: Path) -> None:
    """Gold counts are the file's labels by position (no, yes); the picks' hits are lm-eval's own acc."""
    model, tokenizer = tiny_lm
    labels = ["true", "true", "false", "true", "true", "true", "false", "true"]
    rows = [
        {"question": f"is it number {i}", "passage": f"A man is sitting on roof {i}.", "label": label}
        for i, label in enumerate(labels)
    ]
    files = {"boolq": _write_jsonl(tmp_path / "boolq.jsonl", rows)}
    counts = zs.answer_counts(model, tokenizer, "boolq", batch_size=4, overrides=files)
    assert counts.task == "boolq"
    assert counts.choices == ("no", "yes")
    assert counts.gold == (labels.count("false"), labels.count("true"))
    assert sum(counts.picked) == counts.examples == len(labels)
    acc = evaluate_zero_shot(model, tokenizer, "boolq", batch_size=4, overrides=files)["boolq"]["acc"]
    assert counts.correct / counts.examples == pytest.approx(acc.value)


def test_example_scores_average_to_the_headline_accuracy(tiny_lm: tuple[Any, Any], tmp_path: Path) -> None:
    """Per-example scores are lm-eval's own: their mean is the task's headline metric (acc_norm for PIQA,
    acc for BoolQ), one score per example, each 0 or 1."""
    model, tokenizer = tiny_lm
    # answers of very different lengths, so that acc_norm and acc disagree and the test sees which is used
    piqa = [
        {
            "goal": f"open jar {i}",
            "sol1": "twist",
            "sol2": "eat the lid slowly with a small spoon " * (1 + i % 2),
        }
        for i in range(6)
    ]
    boolq = [
        {"question": f"is it number {i}", "passage": f"A man is sitting on roof {i}.", "label": i % 3 == 0}
        for i in range(7)
    ]
    (tmp_path / "piqa-labels.lst").write_text("0\n0\n0\n0\n0\n1\n")
    files = {
        "piqa": _write_jsonl(tmp_path / "piqa.jsonl", piqa),
        "boolq": _write_jsonl(tmp_path / "boolq.jsonl", boolq),
    }
    scores = zs.example_scores(model, tokenizer, ["piqa", "boolq"], batch_size=4, overrides=files)
    results = evaluate_zero_shot(model, tokenizer, ["piqa", "boolq"], batch_size=4, overrides=files)
    assert results["piqa"]["acc"].value != results["piqa"]["acc_norm"].value
    assert sorted(scores["piqa"]) == list(range(6)) and sorted(scores["boolq"]) == list(range(7))
    for task, metric in (("piqa", "acc_norm"), ("boolq", "acc")):
        values = list(scores[task].values())
        assert set(values) <= {0.0, 1.0}
        assert sum(values) / len(values) == pytest.approx(results[task][metric].value)
