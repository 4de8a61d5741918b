"""Registry of architecture adapters: one per model family, looked up by ``config.model_type``.

This is the one list of supported model types. The pruned model classes live in
``modeling/modeling_multipruner.py``, which is copied next to every saved model and so can import
nothing from here; ``pruned_model_class`` reaches them through this registry, and a test checks that
both name the same types.
"""

from __future__ import annotations

from .base import ArchitectureAdapter, BranchNames, FusedLinear, HeadLayout, UnsupportedArchitectureError
from .gemma import GEMMA
from .llama import LLAMA
from .olmo2 import OLMO2
from .phi3 import PHI3

ADAPTERS: tuple[ArchitectureAdapter, ...] = (LLAMA, GEMMA, OLMO2, PHI3)


def supported_model_types() -> list[str]:
    return sorted(t for adapter in ADAPTERS for t in adapter.model_types)


def adapter_of_type(model_type: str) -> ArchitectureAdapter:
    """The adapter of a ``model_type``; unknown families fail at once, naming the supported ones."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} is not supported; supported model types: {', '.join(supported_model_types())}. "
        "See README 'Adding an architecture'."
    )


def adapter_for(model_or_config) -> ArchitectureAdapter:
    """The adapter of a model or config (a pruned model's config keeps its family's model_type)."""
    config = getattr(model_or_config, "config", model_or_config)
    return adapter_of_type(config.get_text_config(decoder=True).model_type)


def pruned_model_class(model_type: str) -> type:
    """The class a pruned model of this family is built and loaded with (from the saved model code)."""
    adapter_of_type(model_type)  # an unsupported type fails here, with the supported ones named
    from ..modeling.modeling_multipruner import PRUNED_CLASSES

    if model_type not in PRUNED_CLASSES:
        raise RuntimeError(f"internal error: {model_type!r} has an adapter but no pruned model class")
    return PRUNED_CLASSES[model_type]


__all__ = [
    "ADAPTERS",
    "ArchitectureAdapter",
    "BranchNames",
    "FusedLinear",
    "HeadLayout",
    "UnsupportedArchitectureError",
    "adapter_for",
    "adapter_of_type",
    "pruned_model_class",
    "supported_model_types",
]
