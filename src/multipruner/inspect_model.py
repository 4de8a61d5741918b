"""A layer-by-layer description of a (dense or pruned) model: what `multipruner inspect` prints."""

from __future__ import annotations

from torch import nn

from .adapters import adapter_for
from .modeling.modeling_multipruner import RemovedAttention, RemovedMLP


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
    lines = [f"{'layer':>5}  {'attention':>9}  {'heads/kv':>8}  {'mlp':>7}  {'mlp width':>9}  {'params':>11}"]
    for r in rows:
        heads = f"{r['heads']}/{r['kv_heads']}" if r["attention"] else "-"
        lines.append(
            f"{r['layer']:>5}  {'yes' if r['attention'] else 'REMOVED':>9}  {heads:>8}  "
            f"{'yes' if r['mlp'] else 'REMOVED':>7}  {r.get('mlp_width', '-')!s:>9}  {r['params']:>11,}"
        )
    total = sum(p.numel() for p in model.parameters())
    layer_total = sum(r["params"] for r in rows)
    lines.append(f"layers: {layer_total:,} parameters; embeddings/head/final norm: {total - layer_total:,}")
    lines.append(f"total: {total:,} parameters ({type(model).__name__}, {model.config.model_type})")
    return "\n".join(lines)
