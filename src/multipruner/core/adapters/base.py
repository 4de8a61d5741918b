"""The questions the pruning algorithm asks about a model family, answered once per family.

The algorithm never looks at ``model_type``: it asks an :class:`ArchitectureAdapter` where the decoder
layers are, which modules form each residual branch, and how the attention heads are laid out.
Families differ almost only in names, so an adapter is mostly data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UsageError


class UnsupportedArchitectureError(UsageError):
    """The model family has no adapter."""


@dataclass(frozen=True)
class BranchNames:
    """Attribute names, on a decoder layer, of one residual branch: its module and the norms inside it."""

    module: str
    norms: tuple[str, ...]


@dataclass(frozen=True)
class FusedLinear:
    """One linear layer that stacks several logical projections' rows, in order (Phi-3's ``qkv_proj``)."""

    name: str
    parts: tuple[str, ...]


@dataclass(frozen=True)
class HeadLayout:
    """Attention head geometry of one layer.

    A *unit* is the smallest piece of attention that can be removed without breaking the KV sharing:
    under GQA/MHA one KV head with its ``n_rep`` query heads; under MQA (a single KV head shared by all
    query heads) one query head, the KV head staying until the whole block goes.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def n_rep(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def is_mqa(self) -> bool:
        return self.num_kv_heads == 1 and self.num_heads > 1

    @property
    def q_heads_per_unit(self) -> int:
        return 1 if self.is_mqa else self.n_rep

    @property
    def kv_heads_per_unit(self) -> int:
        return 0 if self.is_mqa else 1

    @property
    def num_units(self) -> int:
        return self.num_heads // self.q_heads_per_unit

    @property
    def unit_channels(self) -> int:
        """Query channels in one unit: the smallest step of the attention width."""
        return self.q_heads_per_unit * self.head_dim

    def attention_group_problem(self, group_size: int | None) -> str | None:
        """Why an attention group of ``group_size`` query channels cannot be removed as one step: it splits
        a KV group (None when it does not, or when no positive size is given)."""
        unit = self.unit_channels
        if not group_size or group_size < 0 or group_size % unit == 0:
            return None
        return (
            f"attention group size {group_size} splits a KV group: it must be a multiple of {unit} channels "
            f"({self.q_heads_per_unit} query heads x head_dim {self.head_dim}: whole KV groups)"
        )

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    def kv_width(self, q_width: int) -> int:
        """Key/value channels kept when ``q_width`` query channels are kept."""
        if self.is_mqa:
            return self.head_dim
        return q_width // self.n_rep

    def num_kv_groups(self, q_width: int) -> int:
        """Query heads per KV head at this width (the attention module's ``num_key_value_groups``)."""
        kept_heads = q_width // self.head_dim
        return kept_heads if self.is_mqa else self.n_rep


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Names and geometry of one model family; subclass only where behaviour differs."""

    family: str
    model_types: tuple[str, ...]
    attention: BranchNames
    mlp: BranchNames
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    mlp_in_projs: tuple[str, ...] = ("gate_proj", "up_proj")
    mlp_out_proj: str = "down_proj"
    # norms inside the attention module over a whole projection's output (OLMo 2): their weights
    # follow the query rows / the key rows when heads are reordered or removed
    q_row_norms: tuple[str, ...] = ()
    k_row_norms: tuple[str, ...] = ()
    # each branch's output is normed before the residual add (Gemma, OLMo 2): no linear map folds into it
    branch_outputs_normed: bool = False
    # linears that hold several of the logical projections above, e.g. q/k/v in one (Phi-3)
    fused: tuple[FusedLinear, ...] = ()

    # --- where things are -------------------------------------------------------------------
    def decoder(self, model: nn.Module) -> nn.Module:
        """The base model (embeddings, layers, final norm) inside a *ForCausalLM."""
        return model.model

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self.decoder(model).norm

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    def text_config(self, model_or_config):
        config = getattr(model_or_config, "config", model_or_config)
        return config.get_text_config(decoder=True)

    # --- geometry -------------------------------------------------------------------------
    def head_layout(self, config) -> HeadLayout:
        config = self.text_config(config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return HeadLayout(config.num_attention_heads, kv, head_dim)

    def mlp_width(self, config) -> int:
        return self.text_config(config).intermediate_size

    def logits_from_hidden(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the decoder's *final-normed* hidden states (applies the family's logit soft-capping)."""
        return self._soft_capped(model, self.lm_head(model)(hidden))

    def logits_for_tokens(
        self, model: nn.Module, hidden: torch.Tensor, token_ids: torch.Tensor
    ) -> torch.Tensor:
        """The logits of ``token_ids`` only ([..., len(token_ids)]): a few LM-head rows instead of all."""
        head = self.lm_head(model)
        bias = None if head.bias is None else head.bias[token_ids]
        return self._soft_capped(model, F.linear(hidden, head.weight[token_ids], bias))

    def _soft_capped(self, model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        softcap = self.logit_softcap(model)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def logit_softcap(self, model: nn.Module) -> float | None:
        """The final logits' soft-cap (Gemma 2), or None."""
        return getattr(self.text_config(model), "final_logit_softcapping", None) or None

    # --- sub-modules --------------------------------------------------------------------
    def attention_module(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attention.module)

    def mlp_module(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp.module)

    def branch(self, kind: str) -> BranchNames:
        return {"attention": self.attention, "mlp": self.mlp}[kind]

    # --- logical projections and the linears that hold them -------------------------------
    def input_projections(self, kind: str) -> tuple[str, ...]:
        """Logical projections whose output rows are the branch's channels (q/k/v; gate/up)."""
        return (self.q_proj, self.k_proj, self.v_proj) if kind == "attention" else self.mlp_in_projs

    def output_projection(self, kind: str) -> str:
        return self.o_proj if kind == "attention" else self.mlp_out_proj

    def linear_of(self, projection: str) -> FusedLinear:
        """The linear holding a logical projection, with the parts stacked in it (just itself if unfused)."""
        return next((f for f in self.fused if projection in f.parts), FusedLinear(projection, (projection,)))

    def fused_linear(self, name: str) -> FusedLinear:
        """The parts stacked in the linear called ``name`` (just itself if unfused)."""
        return next((f for f in self.fused if f.name == name), FusedLinear(name, (name,)))

    def linears(self, kind: str) -> tuple[str, ...]:
        """Names of the branch's real linear layers: its input linears, then its output projection."""
        names = dict.fromkeys(self.linear_of(p).name for p in self.input_projections(kind))
        return (*names, self.output_projection(kind))

    def set_head_counts(self, attn: nn.Module, num_heads: int, num_kv_heads: int, num_kv_groups: int) -> None:
        """Tell an attention module how many heads its (narrowed) projections now hold."""
        attn.num_key_value_groups = num_kv_groups
