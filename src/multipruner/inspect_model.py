"""A layer-by-layer description of a (dense or pruned) model: what `multipruner inspect` prints."""

from __future__ import annotations

from torch import nn

from .adapters import adapter_for
from .modeling.modeling_multipruner import RemovedAttention, RemovedMLP
from .tables import render_table


def describe_layers(model: nn.Module) -> list[dict]:
    adapter = adapter_for(model)
    head_dim = adapter.head_layout(model).head_dim
    rows = []
    for i, layer in enumerate(adapter.layers(model)):
        attn, mlp = adapter.attention_module(layer), adapter.mlp_module(layer)
        row = {
            "layer": i,
            "attention": not isinstance(attn, RemovedAttention),
            "mlp": not isinstance(mlp, RemovedMLP),
            "params": sum(p.numel() for p in layer.parameters()),
        }
        if row["attention"]:
            row["heads"] = getattr(attn, adapter.q_proj).out_features // head_dim
            row["kv_heads"] = getattr(attn, adapter.k_proj).out_features // head_dim
        if row["mlp"]:
            row["mlp_width"] = getattr(mlp, adapter.mlp_out_proj).in_features
        rows.append(row)
    return rows


def format_layer_table(model: nn.Module) -> str:
    rows = describe_layers(model)
    header = ("layer", "attention", "heads/kv", "mlp", "mlp width", "params")
    cells = [
        (
            r["layer"],
            "yes" if r["attention"] else "REMOVED",
            f"{r['heads']}/{r['kv_heads']}" if r["attention"] else "-",
            "yes" if r["mlp"] else "REMOVED",
            r.get("mlp_width", "-"),
            f"{r['params']:,}",
        )
        for r in rows
    ]
    total = sum(p.numel() for p in model.parameters())
    layer_total = sum(r["params"] for r in rows)
    return "\n".join(
        [
            render_table(header, cells, align="rrrrrr"),
            f"layers: {layer_total:,} parameters; embeddings/head/final norm: {total - layer_total:,}",
            f"total: {total:,} parameters ({type(model).__name__}, {model.config.model_type})",
        ]
    )
