"""What a model weighs: its parameters, the bytes of its weights and buffers, of a KV cache, and of its files
on disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

MB = 1024**2


def count_params(model: nn.Module) -> int:
    """Parameters of the module; a tied embedding/head counts once (``parameters()`` dedupes)."""
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers: the memory a model costs before it sees any input."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def directory_size_mb(path: str | Path) -> float:
    """Size of every regular file under ``path`` (or of the file itself), in MiB: the on-disk model size."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"cannot measure disk size: {path} does not exist")
    if path.is_file():
        return path.stat().st_size / MB
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / MB


def _tensors_in(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Every tensor reachable from a cache object (DynamicCache layers, legacy tuples, dicts)."""
    if depth > 6 or obj is None:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, list | tuple):
        for item in obj:
            yield from _tensors_in(item, depth + 1)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors_in(item, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, nn.Module | type):
        for item in vars(obj).values():
            yield from _tensors_in(item, depth + 1)


def cache_bytes(cache: Any) -> int:
    """Bytes of a KV cache; tensors sharing storage count once (a removed layer's empty slot counts 0)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in _tensors_in(cache):
        key = (t.untyped_storage().data_ptr(), t.numel())
        if key in seen or t.numel() == 0:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
