"""Rows of logical projections, whether each has its own linear layer or several share one.

The algorithm speaks of logical projections (``q_proj``, ``gate_proj``, ...) and how many output rows
each has. Most families give each its own ``nn.Linear``; fused families (Phi-3) stack several in one
(``qkv_proj`` = q rows, then k rows, then v rows). These helpers turn "rows of a logical projection"
into rows of the real linear, so reordering and narrowing need no per-family branches.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .adapters import ArchitectureAdapter, FusedLinear


def attention_rows(adapter: ArchitectureAdapter, q_rows: int, kv_rows: int) -> dict[str, int]:
    """Row counts of the attention's logical input projections: q, then k and v alike."""
    return {adapter.q_proj: q_rows, adapter.k_proj: kv_rows, adapter.v_proj: kv_rows}


def mlp_rows(adapter: ArchitectureAdapter, width: int) -> dict[str, int]:
    """Row counts of the MLP's logical input projections (gate and up: one row per channel each)."""
    return dict.fromkeys(adapter.input_projections("mlp"), width)


def part_rows(adapter: ArchitectureAdapter, projection: str, sizes: Mapping[str, int]) -> tuple[str, slice]:
    """The linear holding ``projection`` and its rows there; ``sizes`` gives each part's row count."""
    fused = adapter.linear_of(projection)
    start = 0
    for part in fused.parts:
        if part == projection:
            return fused.name, slice(start, start + sizes[part])
        start += sizes[part]
    raise AssertionError("unreachable: linear_of returns a linear holding the projection")


def projection_weight(
    module: nn.Module, adapter: ArchitectureAdapter, projection: str, sizes: Mapping[str, int]
) -> torch.Tensor:
    name, rows = part_rows(adapter, projection, sizes)
    return getattr(module, name).weight[rows]


def permute_projection_rows(
    module: nn.Module,
    adapter: ArchitectureAdapter,
    projection: str,
    index: torch.Tensor,
    sizes: Mapping[str, int],
) -> None:
    """Permute the rows of one logical projection (and its bias), leaving other parts of its linear alone."""
    name, rows = part_rows(adapter, projection, sizes)
    linear = getattr(module, name)
    full = torch.arange(linear.out_features, device=index.device)
    full[rows] = index + rows.start
    linear.weight.data = linear.weight.data.index_select(0, full)
    if linear.bias is not None:
        linear.bias.data = linear.bias.data.index_select(0, full)


def first_rows(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    fused: FusedLinear,
    full: Mapping[str, int],
    kept: Mapping[str, int],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``weight``/``bias`` keeping the first ``kept[p]`` rows of each part ``p`` (``full[p]`` rows each).

    An unfused linear gives a view; a fused one a copy, since the kept rows are not contiguous.
    """
    if len(fused.parts) == 1:
        n = kept[fused.parts[0]]
        return weight[:n], None if bias is None else bias[:n]
    pieces, start = [], 0
    for part in fused.parts:
        pieces.append(slice(start, start + kept[part]))
        start += full[part]
    weight = torch.cat([weight[rows] for rows in pieces])
    return weight, None if bias is None else torch.cat([bias[rows] for rows in pieces])
