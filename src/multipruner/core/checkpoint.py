"""Checkpoint I/O: a pruned model saved as a self-contained directory, and read back."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError
from ..faults import crash_point
from ..io_utils import atomic_directory
from .adapters import pruned_model_class
from .layout import ModelLayout
from .modeling import modeling_multipruner as pruned_modeling
from .plan import PruningPlan

log = logging.getLogger(__name__)

MODELING_FILE = Path(pruned_modeling.__file__)
PLAN_FILENAME = "multipruner_plan.json"


class CheckpointError(UsageError):
    """A saved pruned model that cannot be read."""


def save_pruned(
    model: nn.Module,
    tokenizer,
    output: str | Path,
    plan: PruningPlan | None = None,
    layout: ModelLayout | None = None,
    overwrite: bool = False,
) -> Path:
    """Write model (safetensors), config, tokenizer, model code and plan; all or nothing."""
    output = Path(output)
    with atomic_directory(output, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        crash_point("weights_saved")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shutil.copy(MODELING_FILE, tmp / MODELING_FILE.name)
        if plan is not None:
            plan.save(tmp / PLAN_FILENAME, layout)
            plan.save_reference(tmp / "pruning_config.json")
        crash_point("model_written")
    log.info("saved pruned model to %s", output)
    return output


def saved_plan_data(model_dir: str | Path) -> dict | None:
    """The plan file a saved pruned model holds, as JSON (None: no plan file, e.g. a dense model)."""
    plan_file = Path(model_dir) / PLAN_FILENAME
    return json.loads(plan_file.read_text()) if plan_file.is_file() else None


def load_pruned(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a directory written by ``save_pruned`` with our classes (no remote code)."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
        config["pruned_structure"]  # noqa: B018 - KeyError: not written by multipruner
        model_cls = pruned_model_class(config["model_type"])
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"{path} is not a multipruner checkpoint: {err!r}") from err
    try:
        model = model_cls.from_pretrained(path, dtype=dtype)
    except Exception as err:  # safetensors/transformers raise many types for a damaged file
        raise CheckpointError(f"could not load the pruned model in {path}: {err}") from err
    has_tokenizer = (path / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(path, config=model.config) if has_tokenizer else None
    return model.eval().to(device), tokenizer
