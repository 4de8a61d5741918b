"""Every bad input a new user is likely to give, as one table.

Each case must end with exit code 2, one error line that names the problem (the fragment given here),
no traceback, and no file written or changed anywhere under the test's directory; and, unless it is in
``NEEDS_THE_MODEL``, before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import prune_args, save_tiny_llama, write_calibration_txt

from multipruner.cli import main
from multipruner.run.run_dir import RunDirectory


@dataclass
class World:
    """Inputs shared by every case: a dense model, text, a finished run and its pruned model."""

    root: Path
    model: Path
    calib: Path
    run: Path
    pruned: Path
    plan: Path

    def prune(self, *extra: str, out: Path | None = None, by_tokens: bool = False) -> list[str]:
        return prune_args(self.model, out or self.root / "new-run", self.calib, *extra, by_tokens=by_tokens)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("bad-inputs")
    model = save_tiny_llama(root / "dense")
    calib = write_calibration_txt(root / "calib.txt")
    run = root / "run"
    assert main(prune_args(model, run, calib, "--max-steps", "2", "--extract")) == 0
    return World(root, model, calib, run, run / "model", run / "plan.json")


def _fingerprint(root: Path) -> dict[str, tuple[str, int]]:
    """Every file and directory under ``root``: content hash (files) and permission bits."""
    state = {}
    for path in sorted(root.rglob("*")):
        if path.name == ".lock":  # our own lock file: taking it is not a change
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        state[str(path.relative_to(root))] = (digest, path.stat().st_mode)
    return state


def _file(world: World, name: str, content: bytes | str) -> Path:
    """A prepared input file (created before the fingerprint, so it does not count as written)."""
    path = world.root / "inputs" / name
    path.parent.mkdir(exist_ok=True)
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


def _plan(world: World, name: str, plan: dict) -> str:
    return str(_file(world, name, json.dumps(plan)))


def _with_short_mlp_order(plan: dict) -> dict:
    """The run's plan with a channel order one MLP channel short, as a plan for a narrower model has."""
    order = plan["channel_order"]
    return {**plan, "channel_order": {**order, "mlp": [o[:-1] for o in order["mlp"]]}}


def _corrupt_model(world: World) -> str:
    path = world.root / "inputs" / "corrupt-model"
    if not path.exists():
        path.mkdir(parents=True)
        for item in world.model.iterdir():
            (path / item.name).write_bytes(item.read_bytes())
        (path / "model.safetensors").write_bytes(b"\x00" * 64)
    return str(path)


def _empty_dir(world: World) -> str:
    path = world.root / "inputs" / "empty-dir"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _read_only_dir(world: World) -> Path:
    path = world.root / "inputs" / "read-only"
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    return path


def _run_with_truncated_calibration(world: World) -> Path:
    path = world.root / "inputs" / "truncated-run"
    if not path.exists():
        path.mkdir(parents=True)
        for item in world.run.iterdir():
            if item.is_file() and item.name != ".lock":
                (path / item.name).write_bytes(item.read_bytes())
        calibration = path / "calibration.safetensors"
        calibration.write_bytes(calibration.read_bytes()[:100])  # a kill mid-copy, a full disk
    return path


def _foreign_dir(world: World) -> str:
    path = world.root / "inputs" / "foreign"
    path.mkdir(parents=True, exist_ok=True)
    (path / "notes.txt").write_text("someone else's files")
    return str(path)


def _model_without(world: World, name: str, drop: tuple[str, ...], source: Path | None = None) -> str:
    """A copy of the dense (or ``source``) model directory without the files in ``drop``."""
    path = world.root / "inputs" / name
    if not path.exists():
        path.mkdir(parents=True)
        for item in (source or world.model).iterdir():
            if item.is_file() and item.name not in drop:
                (path / item.name).write_bytes(item.read_bytes())
    return str(path)


def _without_weights(world: World, pruned: bool = False) -> str:
    source = world.pruned if pruned else world.model
    return _model_without(world, f"no-weights-{source.name}", ("model.safetensors",), source)


def _without_tokenizer(world: World, pruned: bool = False) -> str:
    source = world.pruned if pruned else world.model
    return _model_without(
        world, f"no-tokenizer-{source.name}", ("tokenizer.json", "tokenizer_config.json"), source
    )


def _pruned_without_tokenizer(world: World) -> str:
    return _without_tokenizer(world, pruned=True)


def _command(world: World, command: str, model: str) -> list[str]:
    """A command line that would run with a good ``model``: only the model is at fault."""
    root = world.root
    return {
        "prune": _swap_model(world.prune(), model),
        "extract": ["extract", "--model", model, "--plan", str(world.plan), "--output", str(root / "x")],
        "compensate": [
            "compensate",
            "--model",
            model,
            "--plan",
            str(world.plan),
            "--output",
            str(root / "x"),
            "--calibration",
            str(world.calib),
        ],
        "recover": ["recover", "--model", model, "--output", str(root / "x"), "--data", str(world.calib)],
        "eval": ["eval", "--model", model, "--tasks", str(world.calib)],
        "bench": ["bench", "--model", model, "--dense", str(world.model)],
        "export": ["export", "--model", model, "--output", str(root / "x.gguf")],
        "inspect": ["inspect", "--model", model],
    }[command]


COMMANDS = ("prune", "extract", "compensate", "recover", "eval", "bench", "export", "inspect")
NOT_UTF8 = b"\xff\xfe caf\xe9 au lait\n\n" * 20


REFERENCE_PLAN = {
    "pruned_attn_idx": [],
    "pruned_mlp_idx": [],
    "pruned_attn_width": {},
    "pruned_mlp_width": {},
}

# (case id, argv built from the world, fragment the error line must contain)
CASES = [
    # prune: the settings themselves
    ("ratio-zero", lambda w: w.prune("--target_ratio", "0"), "target ratio"),
    ("ratio-100", lambda w: w.prune("--target_ratio", "100"), "target ratio"),
    ("ratio-negative", lambda w: w.prune("--target_ratio", "-5"), "target ratio must be in (0, 100)"),
    (
        "ratio-not-a-number",
        lambda w: w.prune("--target_ratio", "abc"),
        "could not convert string to float: 'abc'",
    ),
    (
        "distribution-two-parts",
        lambda w: w.prune("--pruning_distribution", "1:2"),
        "three non-negative numbers",
    ),
    ("distribution-zero-sum", lambda w: w.prune("--pruning_distribution", "0:0:0"), "distribution"),
    ("budget-no-measure", lambda w: w.prune("--budget", "20%"), "give MEASURE=VALUE"),
    ("budget-bad-unit", lambda w: w.prune("--budget", "weights=3 furlongs"), "unknown unit 'furlongs'"),
    ("budget-not-a-number", lambda w: w.prune("--budget", "weights=lots"), "not a number with"),
    ("budget-factor-below-one", lambda w: w.prune("--budget", "flops=0.5x"), "a factor must be more than 1"),
    (
        "budget-unreachable",
        lambda w: w.prune("--budget", "flops=50x"),
        "cannot be reached: the most this model can lose of its flops is",
    ),
    ("budget-already-met", lambda w: w.prune("--budget", "weights=1GB"), "within it; nothing to remove"),
    (
        "budget-kv-split-over-mlp",
        lambda w: w.prune("--budget", "kv=25%"),
        "MLP channels hold no KV cache",
    ),
    (
        "auto-with-blockpruner",
        lambda w: w.prune("--method", "blockpruner", "--pruning_distribution", "auto"),
        "--distribution auto weighs all three dimensions",
    ),
    ("distribution-negative", lambda w: w.prune("--pruning_distribution", "-1:1:1"), "three non-negative"),
    (
        "mlp-group-zero",
        lambda w: w.prune("--mlp_channel_group_size", "0"),
        "--mlp-group-size must be positive",
    ),
    (
        "attention-group-negative",
        lambda w: w.prune("--attn_channel_group_size", "-32"),
        "--attention-group-size must be positive",
    ),
    (
        "attention-group-not-kv-groups",
        lambda w: w.prune("--attn_channel_group_size", "16"),
        "whole KV groups",
    ),
    (
        "mlp-group-whole-width",
        lambda w: w.prune("--mlp_channel_group_size", "96"),
        "leaves nothing of the width",
    ),
    ("seqlen-one", lambda w: w.prune("--seqlen", "1"), "--seqlen must be at least 2"),
    ("seqlen-beyond-context", lambda w: w.prune("--seqlen", "4096"), "longer than the model's context"),
    ("batch-size-zero", lambda w: w.prune("--batch_size", "0"), "--batch-size must be at least 1"),
    ("max-steps-negative", lambda w: w.prune("--max-steps", "-1"), "max-steps"),
    (
        "token-budget-below-one-sequence",
        lambda w: w.prune("--block-tokens", "8", by_tokens=True),
        "less than one sequence",
    ),
    ("unknown-method", lambda w: w.prune("--method", "slicegpt"), "invalid choice: 'slicegpt'"),
    ("unknown-objective", lambda w: w.prune("--objective", "mse"), "invalid choice: 'mse'"),
    ("finalists-zero", lambda w: w.prune("--finalists", "0"), "--finalists must be at least 1"),
    (
        "screen-set-as-large-as-the-decision-set",
        lambda w: w.prune("--screen-tokens", "64", by_tokens=True),
        "leaves no larger set to decide on",
    ),
    ("layer-major-budget-negative", lambda w: w.prune("--layer-major-mb", "-5"), "--layer-major-mb must be"),
    ("reuse-budget-negative", lambda w: w.prune("--reuse-mb", "-1"), "--reuse-mb must be"),
    ("rescreen-negative", lambda w: w.prune("--rescreen", "-2"), "--rescreen must be"),
    (
        "shortgpt-with-distribution",
        lambda w: [*w.prune(), "--method", "shortgpt"],
        "shortgpt",
    ),
    ("unknown-device", lambda w: w.prune("--device", "foo"), "device"),
    pytest.param(
        "cuda-without-gpu",
        lambda w: w.prune("--device", "cuda"),
        "no CUDA",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
    ),
    *(
        pytest.param(
            f"{command}-cuda-without-gpu",
            lambda w, command=command: [command, "--model", str(w.pruned), "--device", "cuda"],
            "no CUDA",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        )
        for command in ("eval", "bench", "inspect")
    ),
    *(
        (
            f"{command}-unknown-device",
            lambda w, command=command: [command, "--model", str(w.pruned), "--device", "tpu"],
            "device",
        )
        for command in ("eval", "bench")
    ),
    # prune: the model and the data
    ("model-missing", lambda w: w.prune()[:2] + ["./no/such/model"] + w.prune()[3:], "model path not found"),
    (
        "model-is-a-file",
        lambda w: _swap_model(w.prune(), str(w.calib)),
        "neither a model directory nor a .gguf file",
    ),
    ("model-empty-dir", lambda w: _swap_model(w.prune(), _empty_dir(w)), "config.json"),
    ("model-corrupt-weights", lambda w: _swap_model(w.prune(), _corrupt_model(w)), "are damaged"),
    ("model-already-pruned", lambda w: _swap_model(w.prune(), str(w.pruned)), "already pruned"),
    (
        "calibration-missing",
        lambda w: prune_args(w.model, w.root / "new-run", w.root / "nothing.txt"),
        "nor an existing file",
    ),
    (
        "calibration-empty",
        lambda w: prune_args(w.model, w.root / "new-run", _file(w, "empty.txt", "")),
        "empty",
    ),
    (
        "calibration-too-short",
        lambda w: prune_args(
            w.model, w.root / "new-run", _file(w, "short.txt", "tiny\n\ntext"), by_tokens=True
        ),
        "fewer than 16 tokens",
    ),
    # prune: the output
    ("output-is-a-file", lambda w: w.prune(out=w.calib), "is a file; it must be a directory"),
    pytest.param(
        "output-read-only",
        lambda w: w.prune(out=_read_only_dir(w) / "run"),
        "not writable",
        marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories"),
    ),
    (
        "resume-changed-settings",
        lambda w: prune_args(w.model, w.run, w.calib, "--resume", "--seed", "7"),
        "seed",
    ),
    ("rerun-without-resume", lambda w: prune_args(w.model, w.run, w.calib), "--resume"),
    (
        "resume-truncated-calibration",
        lambda w: w.prune("--max-steps", "3", "--resume", out=_run_with_truncated_calibration(w)),
        "calibration.safetensors is damaged",
    ),
    (
        "resume-foreign-directory",
        lambda w: w.prune("--resume", out=Path(_foreign_dir(w))),
        "not a multipruner run",
    ),
    # extract / inspect
    (
        "plan-missing",
        lambda w: [
            "extract",
            "--model",
            str(w.model),
            "--plan",
            str(w.root / "none.json"),
            "--output",
            str(w.root / "x"),
        ],
        "plan file not found",
    ),
    (
        "plan-not-json",
        lambda w: [
            "extract",
            "--model",
            str(w.model),
            "--plan",
            str(_file(w, "bad.json", "{nope")),
            "--output",
            str(w.root / "x"),
        ],
        "plan",
    ),
    (
        "plan-for-another-model",
        lambda w: [
            "extract",
            "--model",
            str(w.model),
            "--plan",
            _plan(w, "other.json", {**REFERENCE_PLAN, "pruned_attn_idx": [30]}),
            "--output",
            str(w.root / "x"),
        ],
        "30",
    ),
    (
        "plan-group-size-not-a-number",
        lambda w: [
            "extract",
            "--model",
            str(w.model),
            "--plan",
            _plan(w, "abc.json", {**json.loads(w.plan.read_text()), "mlp_group_size": "abc"}),
            "--output",
            str(w.root / "x"),
        ],
        "mlp_group_size",
    ),
    (
        "plan-channel-order-for-another-model",
        lambda w: [
            "extract",
            "--model",
            str(w.model),
            "--plan",
            _plan(w, "order.json", _with_short_mlp_order(json.loads(w.plan.read_text()))),
            "--output",
            str(w.root / "x"),
        ],
        "not a permutation",
    ),
    (
        "extract-output-exists",
        lambda w: ["extract", "--model", str(w.model), "--plan", str(w.plan), "--output", str(w.pruned)],
        "exists",
    ),
    ("inspect-missing-model", lambda w: ["inspect", "--model", str(w.root / "nowhere")], "not found"),
    # eval / bench / report
    ("eval-unknown-task", lambda w: ["eval", "--model", str(w.pruned), "--tasks", "mmlu"], "mmlu"),
    ("eval-no-tasks", lambda w: ["eval", "--model", str(w.pruned), "--tasks", ""], "tasks"),
    (
        "eval-seqlen-zero",
        lambda w: ["eval", "--model", str(w.pruned), "--seqlen", "0"],
        "--seqlen (the perplexity window) must be at least 2",
    ),
    ("eval-limit-negative", lambda w: ["eval", "--model", str(w.pruned), "--limit", "-1"], "limit"),
    (
        "eval-task-file-without-equals",
        lambda w: ["eval", "--model", str(w.pruned), "--task-file", "piqa"],
        "TASK=PATH",
    ),
    (
        "eval-output-is-a-directory",
        lambda w: ["eval", "--model", str(w.pruned), "--tasks", str(w.calib), "--output", str(w.run)],
        "directory",
    ),
    (
        "eval-text-shorter-than-a-window",
        lambda w: [
            "eval",
            "--model",
            str(w.pruned),
            "--tasks",
            str(_file(w, "one-line.txt", "just a few words")),
        ],
        "window",
    ),
    ("bench-repeats-zero", lambda w: ["bench", "--model", str(w.pruned), "--repeats", "0"], "repeats"),
    (
        "bench-new-tokens-zero",
        lambda w: ["bench", "--model", str(w.pruned), "--new-tokens", "0"],
        "new-tokens",
    ),
    ("report-not-a-run", lambda w: ["report", _foreign_dir(w)], "not a multipruner run"),
    # export
    (
        "export-output-exists",
        lambda w: ["export", "--model", str(w.pruned), "--output", str(w.calib)],
        "already exists; pass --overwrite",
    ),
    (
        "export-output-is-a-directory",
        lambda w: ["export", "--model", str(w.pruned), "--output", str(w.run)],
        "is a directory",
    ),
    (
        "export-outtype-gguf-cannot-write",
        lambda w: [
            "export",
            "--model",
            str(w.pruned),
            "--outtype",
            "q4_k",
            "--output",
            str(w.root / "x.gguf"),
        ],
        "invalid choice: 'q4_k'",
    ),
    (
        "export-missing-model",
        lambda w: ["export", "--model", str(w.root / "nowhere"), "--output", str(w.root / "x.gguf")],
        "not found",
    ),
    # compensate / recover
    (
        "compensate-negative-damping",
        lambda w: [
            "compensate",
            "--model",
            str(w.model),
            "--plan",
            str(w.plan),
            "--output",
            str(w.root / "x"),
            "--damping",
            "-1",
            "--calibration",
            str(w.calib),
        ],
        "damping",
    ),
    (
        "recover-unknown-targets",
        lambda w: [
            "recover",
            "--model",
            str(w.pruned),
            "--output",
            str(w.root / "x"),
            "--targets",
            "nothing_proj",
        ],
        "nothing_proj",
    ),
    # every command: a model that is not there, or a directory that lacks its weights or its tokenizer
    *(
        (f"{c}-model-missing", lambda w, c=c: _command(w, c, str(w.root / "nowhere")), "not found")
        for c in COMMANDS
    ),
    *(  # recover takes a pruned model; the others a dense one (or either)
        (
            f"{c}-model-without-weights",
            lambda w, c=c: _command(w, c, _without_weights(w, pruned=c == "recover")),
            "no model weights",
        )
        for c in COMMANDS
    ),
    *(
        (
            f"{c}-model-without-tokenizer",
            lambda w, c=c: _command(w, c, _without_tokenizer(w, pruned=c == "recover")),
            "no tokenizer",
        )
        for c in COMMANDS
    ),
    (
        "bench-model-missing-without-dense",
        lambda w: ["bench", "--model", str(w.root / "nowhere")],
        "does not exist",
    ),
    (
        "export-pruned-model-without-any-vocabulary",
        lambda w: ["export", "--model", _pruned_without_tokenizer(w), "--output", str(w.root / "x.gguf")],
        "no tokenizer",
    ),
    ("recover-dense-model", lambda w: _command(w, "recover", str(w.model)), "not a pruned model directory"),
    # every text a command reads: missing, not UTF-8, empty, or records without the text field
    *(
        (
            f"{name}-{fault}",
            lambda w, build=build, content=content, suffix=suffix: build(w, content, suffix),
            fragment,
        )
        for name, build in (
            ("calibration", lambda w, c, x: _swap_calibration(w.prune(), _text(w, "calib", c, x))),
            (
                "compensate-calibration",
                lambda w, c, x: [
                    "compensate",
                    "--model",
                    str(w.model),
                    "--plan",
                    str(w.plan),
                    "--output",
                    str(w.root / "x"),
                    "--calibration",
                    _text(w, "comp", c, x),
                ],
            ),
            (
                "extract-activation-order-calibration",
                lambda w, c, x: [
                    "extract",
                    "--model",
                    str(w.model),
                    "--plan",
                    str(w.root / "run" / "pruning_config.json"),
                    "--output",
                    str(w.root / "x"),
                    "--activation-order",
                    "--calibration",
                    _text(w, "act", c, x),
                ],
            ),
            (
                "recover-data",
                lambda w, c, x: [
                    "recover",
                    "--model",
                    str(w.pruned),
                    "--output",
                    str(w.root / "x"),
                    "--data",
                    _text(w, "rec", c, x),
                ],
            ),
            (
                "prune-recover-data",
                lambda w, c, x: w.prune("--recover", "--recover-data", _text(w, "prd", c, x)),
            ),
        )
        for fault, content, suffix, fragment in (
            ("not-utf8", NOT_UTF8, ".txt", "is not UTF-8 text"),
            ("empty-file", b"", ".txt", "empty"),
            ("jsonl-without-text-field", b'{"body": "a"}\n{"body": "b"}\n', ".jsonl", "no field 'text'"),
            ("json-not-records", b'{"text": "one"}', ".json", "expected a JSON list of records"),
        )
    ),
    (
        "calibration-unknown-name",
        lambda w: _swap_calibration(w.prune(), "wikitext3"),
        "neither a known source",
    ),
    (
        "calibration-on-evaluation-text",
        lambda w: _swap_calibration(w.prune(), "hellaswag-text"),
        "held out for evaluation",
    ),
    # eval: tasks and their files, plans
    (
        "eval-unknown-task-name",
        lambda w: ["eval", "--model", str(w.pruned), "--tasks", "nosuchtask"],
        "nosuchtask",
    ),
    (
        "eval-text-missing",
        lambda w: ["eval", "--model", str(w.pruned), "--tasks", str(w.root / "nowhere.txt")],
        "nor an existing file",
    ),
    (
        "eval-text-not-utf8",
        lambda w: ["eval", "--model", str(w.pruned), "--tasks", _text(w, "eval", NOT_UTF8, ".txt")],
        "is not UTF-8 text",
    ),
    (
        "eval-task-file-missing",
        lambda w: [
            "eval",
            "--model",
            str(w.pruned),
            "--tasks",
            "piqa",
            "--task-file",
            f"piqa={w.root / 'no.jsonl'}",
        ],
        "does not exist",
    ),
    (
        "eval-task-file-for-unknown-task",
        lambda w: ["eval", "--model", str(w.pruned), "--tasks", "piqa", "--task-file", f"mmlu={w.calib}"],
        "mmlu",
    ),
    (
        "eval-plan-missing",
        lambda w: [
            "eval",
            "--model",
            str(w.model),
            "--tasks",
            str(w.calib),
            "--plan",
            str(w.root / "none.json"),
        ],
        "plan file not found",
    ),
    (
        "eval-activation-order-without-plan",
        lambda w: ["eval", "--model", str(w.model), "--activation-order"],
        "--plan",
    ),
    (
        "prune-eval-unknown-task",
        lambda w: w.prune("--do_eval", "--eval-tasks", "nosuchtask"),
        "nosuchtask",
    ),
    (
        "prune-reference-eval-only-unknown-task",
        lambda w: [
            "prune",
            "--model_path",
            str(w.model),
            "--do_eval",
            "--pruned_model_config_file",
            str(w.root / "run" / "pruning_config.json"),
            "--eval-tasks",
            "nosuchtask",
        ],
        "nosuchtask",
    ),
    (
        "prune-reference-eval-only-plan-missing",
        lambda w: [
            "prune",
            "--model_path",
            str(w.model),
            "--do_eval",
            "--pruned_model_config_file",
            str(w.root / "none.json"),
            "--eval-tasks",
            str(w.calib),
        ],
        "plan file not found",
    ),
    # outputs of the other commands
    (
        "compensate-output-exists",
        lambda w: [*_command(w, "compensate", str(w.model))[:5], "--output", str(w.pruned)],
        "already exists; pass --overwrite",
    ),
    (
        "compensate-plan-missing",
        lambda w: [
            "compensate",
            "--model",
            str(w.model),
            "--plan",
            str(w.root / "none.json"),
            "--output",
            str(w.root / "x"),
        ],
        "plan file not found",
    ),
    (
        "recover-output-exists",
        lambda w: [*_command(w, "recover", str(w.pruned))[:3], "--output", str(w.run)],
        "already exists; pass --overwrite",
    ),
    (
        "recover-output-is-a-file",
        lambda w: [*_command(w, "recover", str(w.pruned))[:3], "--output", str(w.calib), "--overwrite"],
        "is a file; it must be a directory",
    ),
    (
        "extract-output-is-a-file",
        lambda w: [
            "extract",
            "--model",
            str(w.model),
            "--plan",
            str(w.plan),
            "--output",
            str(w.calib),
            "--overwrite",
        ],
        "is a file; it must be a directory",
    ),
    (
        "bench-output-is-a-directory",
        lambda w: ["bench", "--model", str(w.pruned), "--output", str(w.run)],
        "is a directory; give a file name such as",
    ),
    (
        "eval-output-under-a-file",
        lambda w: [
            "eval",
            "--model",
            str(w.pruned),
            "--tasks",
            str(w.calib),
            "--output",
            str(w.calib / "e.json"),
        ],
        "is a file, not a directory",
    ),
]


def _swap_model(argv: list[str], model: str) -> list[str]:
    argv = list(argv)
    argv[argv.index("--model_path") + 1] = model
    return argv


def _swap_calibration(argv: list[str], source: str) -> list[str]:
    argv = list(argv)
    argv[argv.index("--calibration_dataset") + 1] = source
    return argv


def _text(world: World, name: str, content: bytes, suffix: str) -> str:
    return str(_file(world, f"{name}-{hashlib.sha256(content).hexdigest()[:8]}{suffix}", content))


# Cases whose refusal needs the loaded model (its layout, its context length, its tokenizer, its modules);
# every other case must be refused before any model loads.
NEEDS_THE_MODEL = {
    "budget-unreachable",  # what the model can give: its layout
    "budget-already-met",
    "budget-kv-split-over-mlp",
    "seqlen-beyond-context",  # the model's context length
    "attention-group-not-kv-groups",  # the model's head layout
    "mlp-group-whole-width",  # the model's MLP width
    "calibration-too-short",  # tokens: the tokenizer
    "plan-for-another-model",  # a reference plan is read against the model's layout
    "plan-channel-order-for-another-model",
    "eval-text-shorter-than-a-window",  # tokens
    "recover-unknown-targets",  # the model's linear modules
    "resume-truncated-calibration",  # read after the model (the run directory's own file)
}


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if any model loads (every loader the commands reach goes through these two)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a model was loaded: {args[:1]}")

    monkeypatch.setattr("multipruner.models.load_model", refuse)
    monkeypatch.setattr("multipruner.core.checkpoint.load_pruned", refuse)


def _case_id(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


def test_the_table_is_large_enough():
    assert len({_case_id(c) for c in CASES}) == len(CASES) >= 30
    assert NEEDS_THE_MODEL <= {_case_id(c) for c in CASES}


@pytest.mark.parametrize("case, build, fragment", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_input_is_one_clear_error_and_writes_nothing(
    world, case, build, fragment, capsys, monkeypatch, request
):
    monkeypatch.chdir(world.root)
    argv = build(world)  # prepares its input files first
    if case not in NEEDS_THE_MODEL:
        request.getfixturevalue("no_model_loads")
    before = _fingerprint(world.root)
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, f"{case}: exit {code}\n{err[-2000:]}"
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err[-2000:]
    assert fragment in errors[0], errors[0]
    assert _fingerprint(world.root) == before, f"{case} wrote or changed files"


def test_a_run_directory_in_use_is_refused_with_the_holder(world, capsys):
    holder = RunDirectory(world.run)
    holder.lock()  # a second open file description: flock conflicts even within one process
    try:
        before = _fingerprint(world.root)
        assert main(prune_args(world.model, world.run, world.calib, "--resume")) == 2
        err = capsys.readouterr().err
        assert f"in use by pid {os.getpid()}" in err and "Traceback" not in err
        assert _fingerprint(world.root) == before
    finally:
        holder._lock_handle.close()
