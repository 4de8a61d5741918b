"""A layer-by-layer description of a (dense or pruned) model: what `multipruner inspect` prints."""

from __future__ import annotations

from torch import nn

from ..tables import render_table
from .adapters import adapter_for


def _present(branch: nn.Module) -> bool:
    # a removed branch's stand-in holds no weights; checked by that, not by class, because a model loaded
    # with trust_remote_code has its own copy of the stand-in classes
    return next(branch.parameters(), None) is not None


def describe_layers(model: nn.Module) -> list[dict]:
    adapter = adapter_for(model)
    head_dim = adapter.head_layout(model).head_dim
    rows = []
    for i, layer in enumerate(adapter.layers(model)):
        attn, mlp = adapter.attention_module(layer), adapter.mlp_module(layer)
        row = {
            "layer": i,
            "attention": _present(attn),
            "mlp": _present(mlp),
            "params": sum(p.numel() for p in layer.parameters()),
        }
        if row["attention"]:
            # o_proj reads the query channels; q, k and v rows share the input linears (k and v alike)
            q_rows = getattr(attn, adapter.o_proj).in_features
            in_rows = sum(getattr(attn, name).out_features for name in adapter.linears("attention")[:-1])
            row["heads"] = q_rows // head_dim
            row["kv_heads"] = (in_rows - q_rows) // 2 // head_dim
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
