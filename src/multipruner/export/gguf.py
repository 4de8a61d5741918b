"""GGUF export for llama.cpp, with every layer's own shape.

A pruned model has different head counts and MLP widths in every layer, and some layers lack a branch.
llama.cpp's ``deci`` architecture (written for the Nemotron-NAS models) reads per-layer arrays for
``attention.head_count``, ``attention.head_count_kv`` and ``feed_forward_length``, and otherwise uses
llama's tensor names and graph. Three quirks of its current code (checked in the llama.cpp vendored by
llama-cpp-python 0.3.36, ``src/models/deci.cpp`` and ``src/llama-model.cpp``) decide the representation:

1. A layer with ``feed_forward_length == 0`` ``continue``s before ``inpL = cur``: if it kept attention,
   the attention output is lost; if it is the last layer, its rows are never narrowed to the outputs.
   So a removed MLP in such a layer is written as a *zero FFN* of width 1 (ones norm, zero gate, up and
   down): it adds exactly 0 to the residual stream (0 x finite = 0), costing 3 x hidden weights.
2. The head size (and ``key_length``) is only read when *layer 0* has heads; a model whose layer 0 has
   no attention would get head size 0 everywhere. So a removed attention in layer 0 is written as a
   *zero attention* of one KV group whose output projection is zero: again exactly 0 added.
3. ``rope.dimension_count`` must equal the head size (llama-style NORM rope), so q/k rows are permuted
   from Hugging Face's rotate-half layout exactly as llama.cpp's own converter does.

Elsewhere a removed attention is ``head_count 0`` and a layer with neither branch is ``head_count 0`` and
``feed_forward_length 0``, which deci computes as the identity.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.adapters import ArchitectureAdapter, adapter_for
from ..core.inspect_model import describe_layers
from ..core.projections import attention_rows, mlp_rows, part_rows
from ..errors import UsageError
from ..io_utils import check_output, follow_umask, remove_stale_temporaries
from ..model_sources import EMBEDDED, dense_source_of
from ..settings import setting

log = logging.getLogger(__name__)

ARCH = "deci"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


class ExportError(UsageError):
    """A model or request that cannot be written as GGUF; the message says why."""


@dataclass(frozen=True)
class GGUFExportSettings:
    outtype: str = setting(
        "f16",
        choices=OUTTYPES,
        help="weight type of the 2-D tensors (norms stay f32; q8_0 keeps f16 where a row is not a multiple of 32)",
    )
    overwrite: bool = setting(False, help="replace an existing output file")


@dataclass(frozen=True)
class LayerShape:
    """What one layer is written as (after the stand-ins described in the module docstring)."""

    heads: int
    kv_heads: int
    ff: int
    zero_attention: bool = False
    zero_ffn: bool = False


def _gguf():
    import gguf  # a dependency of transformers' GGUF loading; imported late to keep the CLI start fast

    return gguf


# --- what can be expressed ---------------------------------------------------------------------
def unsupported_reason(model: nn.Module, adapter: ArchitectureAdapter) -> str | None:
    """Why llama.cpp's deci architecture cannot compute this model, or None."""
    config = adapter.text_config(model)
    if adapter.branch_outputs_normed:
        return f"{adapter.family} norms each branch's output before the residual add; deci has no such norm"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"its MLP activation is {config.hidden_act}; deci's FFN is SiLU-gated"
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        return f"its rope ({rope.get('rope_type')}, partial factor {rope.get('partial_rotary_factor', 1.0)}) is not plain full-width rope"
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    if sliding or "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return "it uses sliding-window attention, which deci does not have"
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, name, None):
            return f"it soft-caps logits ({name}), which deci does not"
    return None


def layer_shapes(model: nn.Module, adapter: ArchitectureAdapter) -> list[LayerShape]:
    heads = adapter.head_layout(model)
    rows = describe_layers(model)
    shapes = []
    for i, row in enumerate(rows):
        last = i == len(rows) - 1
        if row["attention"]:
            h, kv, zero_attention = row["heads"], row["kv_heads"], False
        elif i == 0:  # quirk 2
            h, kv, zero_attention = heads.q_heads_per_unit, 1, True
        else:
            h, kv, zero_attention = 0, 0, False
        zero_ffn = not row["mlp"] and (h > 0 or last)  # quirk 1
        ff = row["mlp_width"] if row["mlp"] else 1 if zero_ffn else 0
        shapes.append(LayerShape(h, kv, ff, zero_attention, zero_ffn))
    return shapes


# --- tensors -------------------------------------------------------------------------------------
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _hf_tensors(model: nn.Module, adapter: ArchitectureAdapter, shapes: list[LayerShape]) -> Iterator:
    """``(hf_name, tensor)`` with fused linears split into their logical projections (tied weights once)."""
    head_dim = adapter.head_layout(model).head_dim
    for name, tensor in model.named_parameters():
        module_name, _, leaf = name.rpartition(".")
        parent, _, linear = module_name.rpartition(".")
        fused = adapter.fused_linear(linear)
        if len(fused.parts) == 1:
            yield name, tensor
            continue
        shape = shapes[int(_LAYER.search(name).group(1))]
        sizes = attention_rows(adapter, shape.heads * head_dim, shape.kv_heads * head_dim)
        sizes |= mlp_rows(adapter, shape.ff)
        for part in fused.parts:
            yield f"{parent}.{part}.{leaf}", tensor[part_rows(adapter, part, sizes)[1]]


def _rope_permute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's rotate-half rows -> llama.cpp's interleaved pairs (its converter's ``permute``)."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _stand_ins(i: int, shape: LayerShape, hidden: int, head_dim: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if shape.zero_attention:
        q, kv = shape.heads * head_dim, shape.kv_heads * head_dim
        out |= {
            f"blk.{i}.attn_norm.weight": torch.ones(hidden),
            f"blk.{i}.attn_q.weight": torch.zeros(q, hidden),
            f"blk.{i}.attn_k.weight": torch.zeros(kv, hidden),
            f"blk.{i}.attn_v.weight": torch.zeros(kv, hidden),
            f"blk.{i}.attn_output.weight": torch.zeros(hidden, q),
        }
    if shape.zero_ffn:
        out |= {
            f"blk.{i}.ffn_norm.weight": torch.ones(hidden),
            f"blk.{i}.ffn_gate.weight": torch.zeros(1, hidden),
            f"blk.{i}.ffn_up.weight": torch.zeros(1, hidden),
            f"blk.{i}.ffn_down.weight": torch.zeros(hidden, 1),
        }
    return out


def gguf_tensors(model: nn.Module, adapter: ArchitectureAdapter, shapes: list[LayerShape]) -> dict:
    """Every tensor under its GGUF name, as float32 torch tensors; refuses what deci has no tensor for."""
    gguf = _gguf()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI, len(shapes))
    head_dim = adapter.head_layout(model).head_dim
    out, unmapped = {}, []
    for hf_name, tensor in _hf_tensors(model, adapter, shapes):
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            unmapped.append(hf_name)
            continue
        t = tensor.detach().float().cpu()
        if name.rsplit(".", 2)[-2] in ("attn_q", "attn_k"):
            shape = shapes[int(_LAYER.search(hf_name).group(1))]
            t = _rope_permute(t, shape.heads if ".attn_q." in name else shape.kv_heads)
        out[name] = t
    if unmapped:
        raise ExportError(
            f"llama.cpp's deci architecture has no tensor for {', '.join(unmapped[:3])}"
            + (f" (and {len(unmapped) - 3} more)" if len(unmapped) > 3 else "")
        )
    hidden = adapter.text_config(model).hidden_size
    for i, shape in enumerate(shapes):
        out |= _stand_ins(i, shape, hidden, head_dim)
    return out


def _encode(tensor: torch.Tensor, outtype: str):
    """``(array, raw_dtype)`` for GGUFWriter.add_tensor: 1-D tensors stay f32, as llama.cpp expects."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    data = tensor.numpy().astype(np.float32)
    if data.ndim == 1 or outtype == "f32":
        return data, None
    if outtype == "f16" or (outtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0]):
        return data.astype(np.float16), None
    kind = q.BF16 if outtype == "bf16" else q.Q8_0
    return gguf.quants.quantize(data, kind), kind


# --- tokenizer -----------------------------------------------------------------------------------
def copy_tokenizer_from_gguf(writer, source: Path) -> None:
    """The ``tokenizer.*`` metadata of a GGUF file, as it is (the embedded models' own vocabularies)."""
    gguf = _gguf()
    reader = gguf.GGUFReader(source)
    for field in reader.fields.values():
        if field.name.startswith("tokenizer."):
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type)


def write_hf_tokenizer(writer, tokenizer, directory: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (tokenizer.json) in llama.cpp's ``gpt2`` form, via gguf's SpecialVocab."""
    gguf = _gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    model_type = type(backend.model).__name__ if backend is not None else None
    if model_type != "BPE":
        raise ExportError(
            f"the tokenizer in {directory} is {model_type or 'not a fast tokenizer'}; only byte-level BPE "
            "tokenizers can be written from Hugging Face files (export from the model's source .gguf instead)"
        )
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer)


# --- the file ------------------------------------------------------------------------------------
def vocabulary_gguf(spec: str) -> Path | None:
    """The GGUF file whose vocabulary a model uses: the model's own, or its dense source's (pruned dirs)."""
    if Path(spec).is_dir():
        source = dense_source_of(spec)
        return None if source is None else vocabulary_gguf(source)
    if spec in EMBEDDED:
        return EMBEDDED[spec].gguf_path()
    return Path(spec) if spec.endswith(".gguf") and Path(spec).is_file() else None


def display_name(spec: str) -> str:
    """``runs/smol10/model`` -> ``smol10-model``: the run says more than the folder name ``model``."""
    path = Path(spec)
    return f"{path.resolve().parent.name}-{path.name}" if path.is_dir() else path.stem


def check_output_file(path: Path, overwrite: bool) -> None:
    """The GGUF file can be written (before the model loads)."""
    check_output(path, overwrite=overwrite, example="model.gguf")


def export_gguf(
    model: nn.Module,
    path: Path,
    *,
    outtype: str = "f16",
    overwrite: bool = False,
    tokenizer=None,
    tokenizer_dir: Path | None = None,
    tokenizer_gguf: Path | None = None,
    name: str = "multipruner",
) -> Path:
    """Write ``model`` (dense or pruned) as a deci GGUF at ``path``, atomically; returns ``path``.

    The vocabulary comes from ``tokenizer_gguf`` (copied as is) or else from a byte-level BPE
    ``tokenizer`` saved in ``tokenizer_dir``. Everything is checked before the first byte is written.
    """
    gguf = _gguf()
    path = Path(path)
    if outtype not in OUTTYPES:
        raise ExportError(
            f"--outtype {outtype!r} is not one gguf can write here; choose one of {', '.join(OUTTYPES)}"
        )
    check_output_file(path, overwrite)
    adapter = adapter_for(model)
    reason = unsupported_reason(model, adapter)
    if reason:
        raise ExportError(f"cannot export a {adapter.family} model to GGUF: {reason}")
    if tokenizer_gguf is None and (tokenizer is None or tokenizer_dir is None):
        raise ExportError(
            "no vocabulary to write: give the source .gguf or a model directory with its tokenizer"
        )
    config = adapter.text_config(model)
    shapes = layer_shapes(model, adapter)
    tensors = gguf_tensors(model, adapter, shapes)  # may refuse: before anything is written
    head_dim = adapter.head_layout(model).head_dim
    vocab_size = model.get_input_embeddings().weight.shape[0]

    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_name(name)
        writer.add_file_type(
            {
                "f32": gguf.LlamaFileType.ALL_F32,
                "f16": gguf.LlamaFileType.MOSTLY_F16,
                "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            }[outtype]
        )
        writer.add_block_count(len(shapes))
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length([s.ff for s in shapes])
        writer.add_head_count([s.heads for s in shapes])
        writer.add_head_count_kv([s.kv_heads for s in shapes])
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(vocab_size)
        if tokenizer_gguf is not None:
            copy_tokenizer_from_gguf(writer, Path(tokenizer_gguf))
        else:
            write_hf_tokenizer(writer, tokenizer, Path(tokenizer_dir), vocab_size)
        for tensor_name, tensor in tensors.items():
            data, raw_dtype = _encode(tensor, outtype)
            writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        follow_umask(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
