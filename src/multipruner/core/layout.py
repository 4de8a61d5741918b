"""Parameter geometry of a dense model, enough to count the parameters of any plan without building it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from .adapters import ArchitectureAdapter, HeadLayout, adapter_for, adapter_of_type


@dataclass(frozen=True)
class ModelLayout:
    """Shapes of a dense decoder whose layers are all alike (true of every supported family)."""

    model_type: str
    num_layers: int
    hidden_size: int
    mlp_width: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    non_layer_params: int  # embeddings, untied head, final norm
    attention_fixed_params: int  # branch norms and per-head q/k norms: independent of the width
    mlp_fixed_params: int
    q_bias: bool
    kv_bias: bool
    o_bias: bool
    mlp_in_bias: bool
    mlp_out_bias: bool
    num_mlp_in_projs: int
    # norms over a whole query / key projection (OLMo 2): their size follows the width
    q_row_norms: int = 0
    k_row_norms: int = 0
    # for the costs that are not parameters (search/cost.py): the LM head's rows, and each layer's
    # attention span (0: the whole context; else a sliding window)
    vocab_size: int = 0
    attention_windows: tuple[int, ...] = ()

    @property
    def heads(self) -> HeadLayout:
        return HeadLayout(self.num_heads, self.num_kv_heads, self.head_dim)

    @property
    def attention_width(self) -> int:
        return self.heads.q_width

    def attention_params(self, q_width: int) -> int:
        kv_width = self.heads.kv_width(q_width)
        h = self.hidden_size
        return (
            h * q_width
            + 2 * h * kv_width
            + q_width * h
            + (q_width if self.q_bias else 0)
            + (2 * kv_width if self.kv_bias else 0)
            + (h if self.o_bias else 0)
            + self.q_row_norms * q_width
            + self.k_row_norms * kv_width
            + self.attention_fixed_params
        )

    def mlp_params(self, width: int) -> int:
        h = self.hidden_size
        return (
            self.num_mlp_in_projs * (h * width + (width if self.mlp_in_bias else 0))
            + width * h
            + (h if self.mlp_out_bias else 0)
            + self.mlp_fixed_params
        )

    def branch_norm_params(self, kind: str) -> int:
        """Parameters of the norms around one branch ("attention" or "mlp"), outside its module."""
        return len(adapter_of_type(self.model_type).branch(kind).norms) * self.hidden_size

    def dense_params(self) -> int:
        per_layer = self.attention_params(self.attention_width) + self.mlp_params(self.mlp_width)
        return self.non_layer_params + self.num_layers * per_layer

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelLayout:
        # layouts saved before a field existed take its default
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        if "attention_windows" in fields:
            fields["attention_windows"] = tuple(fields["attention_windows"])
        return cls(**fields)


def attention_windows(config, num_layers: int) -> tuple[int, ...]:
    """Each layer's sliding window (0: it attends to the whole context), from the config's layer types."""
    window = getattr(config, "sliding_window", None) or 0
    types = getattr(config, "layer_types", None) or ["full_attention"] * num_layers
    return tuple(window if kind == "sliding_attention" else 0 for kind in types)


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def layout_of(model: nn.Module, adapter: ArchitectureAdapter | None = None) -> ModelLayout:
    """Measure a dense model (works on the meta device too)."""
    adapter = adapter or adapter_for(model)
    config = adapter.text_config(model)
    heads = adapter.head_layout(config)
    layer = adapter.layers(model)[0]
    attn, mlp = adapter.attention_module(layer), adapter.mlp_module(layer)
    # the projections, and the q/k norms over whole projections, are counted with the width they follow
    projs = {*adapter.linears("attention"), *adapter.q_row_norms, *adapter.k_row_norms}
    attn_fixed = _numel(p for name, m in attn.named_children() if name not in projs for p in m.parameters())
    attn_fixed += _numel(getattr(layer, n).weight for n in adapter.attention.norms)
    mlp_projs = set(adapter.linears("mlp"))
    mlp_fixed = _numel(p for name, m in mlp.named_children() if name not in mlp_projs for p in m.parameters())
    mlp_fixed += _numel(getattr(layer, n).weight for n in adapter.mlp.norms)
    layer_params = {id(p) for lyr in adapter.layers(model) for p in lyr.parameters()}
    non_layer = _numel(p for p in model.parameters() if id(p) not in layer_params)
    has_bias = lambda module, name: getattr(module, adapter.linear_of(name).name).bias is not None  # noqa: E731
    layout = ModelLayout(
        model_type=config.model_type,
        num_layers=len(adapter.layers(model)),
        hidden_size=config.hidden_size,
        mlp_width=getattr(mlp, adapter.mlp_out_proj).in_features,
        num_heads=heads.num_heads,
        num_kv_heads=heads.num_kv_heads,
        head_dim=heads.head_dim,
        non_layer_params=non_layer,
        attention_fixed_params=attn_fixed,
        mlp_fixed_params=mlp_fixed,
        q_bias=has_bias(attn, adapter.q_proj),
        kv_bias=has_bias(attn, adapter.k_proj),
        o_bias=has_bias(attn, adapter.o_proj),
        mlp_in_bias=has_bias(mlp, adapter.mlp_in_projs[0]),
        mlp_out_bias=has_bias(mlp, adapter.mlp_out_proj),
        num_mlp_in_projs=len(adapter.mlp_in_projs),
        q_row_norms=len(adapter.q_row_norms),
        k_row_norms=len(adapter.k_row_norms),
        vocab_size=adapter.lm_head(model).weight.shape[0],
        attention_windows=attention_windows(config, len(adapter.layers(model))),
    )
    measured = _numel(model.parameters())
    if layout.dense_params() != measured:
        raise ValueError(
            f"internal: layout counts {layout.dense_params()} parameters but the model has {measured}; "
            "the model is not a plain dense model of its family (already pruned?)"
        )
    return layout
