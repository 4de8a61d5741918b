"""Extraction: a physically smaller model holding only the weights a plan keeps."""

from __future__ import annotations

import logging

import torch
from torch import nn

from .adapters import ArchitectureAdapter, pruned_model_class
from .layout import ModelLayout
from .plan import PruningPlan
from .surgery import PrunableModel

log = logging.getLogger(__name__)


def pruned_structure(plan: PruningPlan, layout: ModelLayout, adapter: ArchitectureAdapter) -> dict:
    heads = layout.heads
    layers = []
    for i in range(layout.num_layers):
        attn = None
        if i not in plan.removed_attention:
            q = plan.attention_width[i]
            attn = {"num_heads": q // heads.head_dim, "num_kv_heads": heads.kv_width(q) // heads.head_dim}
        mlp = None if i in plan.removed_mlp else {"intermediate_size": plan.mlp_width[i]}
        layers.append({"attention": attn, "mlp": mlp})
    return {
        "attention_module": adapter.attention.module,
        "mlp_module": adapter.mlp.module,
        "attention_norms": list(adapter.attention.norms),
        "mlp_norms": list(adapter.mlp.norms),
        "layers": layers,
    }


def pruned_config(dense_config, plan: PruningPlan, layout: ModelLayout, adapter: ArchitectureAdapter):
    """The pruned model's config: the family's own config class (dense sizes stay the global values) plus
    ``pruned_structure``, and an ``auto_map`` that sends AutoModelForCausalLM to the saved model code."""
    text_config = dense_config.get_text_config(decoder=True)
    model_cls = pruned_model_class(text_config.model_type)
    data = text_config.to_dict()
    data.update(
        architectures=[model_cls.__name__],
        head_dim=layout.head_dim,
        pruned_structure=pruned_structure(plan, layout, adapter),
        auto_map={"AutoModelForCausalLM": f"modeling_multipruner.{model_cls.__name__}"},
    )
    for key in ("transformers_version", "quantization_config"):  # the pruned weights are plain floats
        data.pop(key, None)
    return type(text_config).from_dict(data), model_cls


def _kept_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The masked model's state dict, copying only what a plain load could not use as is.

    Under a plan, row slices (``weight[:rows]``) are contiguous views and are kept as views; column
    slices (``weight[:, :cols]``) are not contiguous, so ``.contiguous()`` copies just those. Full
    tensors are the dense ones themselves. Each keeps its dtype and device.
    """
    return {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}


def _fill_meta_buffers(pruned: nn.Module, dense: nn.Module) -> None:
    """Take the buffers ``load_state_dict`` does not set (non-persistent: rotary ``inv_freq``, Gemma's
    embed scale, ...) from the dense model, by name: the masked model has the extracted one's names."""
    dense_buffers = dict(dense.named_buffers(remove_duplicate=False))
    for name, buffer in pruned.named_buffers(remove_duplicate=False):
        if buffer.device.type != "meta":
            continue
        if name not in dense_buffers:
            raise RuntimeError(f"internal error: buffer {name} of the pruned model has no dense counterpart")
        module_name, _, attr = name.rpartition(".")
        # cloned: buffers are small, and some (rotary state) are replaced or updated during inference
        pruned.get_submodule(module_name)._buffers[attr] = dense_buffers[name].clone()


def _meta_tensor_names(model: nn.Module) -> list[str]:
    """Parameters, buffers and plain tensor attributes of ``model`` still on the meta device."""
    names = [n for n, t in model.named_parameters(remove_duplicate=False) if t.device.type == "meta"]
    names += [n for n, t in model.named_buffers(remove_duplicate=False) if t.device.type == "meta"]
    for module_name, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and value.device.type == "meta":
                names.append(f"{module_name}.{attr}" if module_name else attr)
    return names


@torch.no_grad()
def extract(prunable: PrunableModel, plan: PruningPlan) -> nn.Module:
    """A new model holding only the weights ``plan`` keeps, with the masked model's outputs.

    The dense model must already be reordered if the plan says so (see ``PrunableModel.from_plan``).

    The pruned model is built on the meta device (no random initialisation, no memory) and then given
    the masked dense model's tensors: each keeps the dtype and device of the dense tensor it comes from
    (a model spread over devices stays where it is), and only column slices, which are not contiguous,
    are copied. So the result **shares storage with the dense model** for every full or row-sliced
    tensor (a row-sliced tensor keeps the dense tensor's whole storage alive): the extra memory is a
    fraction of the dense model's rather than a second full copy. In-place edits of the pruned model's
    weights therefore change the dense model too (and vice versa); callers that modify weights in place
    (fine-tuning, quantising in place, ...) must clone them first, e.g.
    ``for p in pruned.parameters(): p.data = p.data.clone()``.
    """
    with prunable.trial(plan):  # refuses a plan that does not fit the model, before anything is built
        config, model_cls = pruned_config(prunable.model.config, plan, prunable.layout, prunable.adapter)
        with torch.device("meta"):
            pruned = model_cls(config)
        pruned.load_state_dict(_kept_tensors(prunable.model), strict=True, assign=True)
        _fill_meta_buffers(pruned, prunable.model)
    pruned.tie_weights()
    if left := _meta_tensor_names(pruned):
        raise RuntimeError(f"internal error: extraction left tensors on the meta device: {left[:8]}")
    log.debug("extracted %d parameters", sum(p.numel() for p in pruned.parameters()))
    return pruned.eval()
