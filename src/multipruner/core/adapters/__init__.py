"""Registry of architecture adapters: one per model family, looked up by ``config.model_type``."""

from __future__ import annotations

from .base import ArchitectureAdapter, BranchNames, FusedLinear, HeadLayout, UnsupportedArchitectureError
from .gemma import GEMMA
from .llama import LLAMA
from .olmo2 import OLMO2
from .phi3 import PHI3

ADAPTERS: tuple[ArchitectureAdapter, ...] = (LLAMA, GEMMA, OLMO2, PHI3)
PRUNED_PREFIX = "multipruner_"


def supported_model_types() -> list[str]:
    return sorted(t for adapter in ADAPTERS for t in adapter.model_types)


def base_model_type(model_type: str) -> str:
    """The family's own model_type, also for a model saved by multipruner (``multipruner_llama``)."""
    return model_type.removeprefix(PRUNED_PREFIX)


def adapter_for(model_or_config) -> ArchitectureAdapter:
    """The adapter of a model or config; unknown families fail at once, naming the supported ones."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = base_model_type(config.get_text_config(decoder=True).model_type)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} is not supported; supported model types: {', '.join(supported_model_types())}. "
        "See README 'Adding an architecture'."
    )


__all__ = [
    "ADAPTERS",
    "ArchitectureAdapter",
    "BranchNames",
    "FusedLinear",
    "HeadLayout",
    "UnsupportedArchitectureError",
    "adapter_for",
    "base_model_type",
    "supported_model_types",
]
