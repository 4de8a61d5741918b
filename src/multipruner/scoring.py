"""Calibration perplexity of many candidate plans, computed exactly but without redundant work.

A candidate that changes layer ``i`` leaves the hidden states entering layer ``i`` untouched. So, per
calibration batch, one forward of the current model records every decoder layer's input and call
arguments (mask, rotary tables: whatever the family passes), and each candidate re-runs only layers
``i..L-1`` from the recorded input, through HF's own layer modules. The loss is computed in chunks of
tokens, so the [tokens x vocab] logits tensor never exists whole (Gemma 3's vocabulary is 262k).

Perplexity follows the reference: exp of the mean over sequences of each sequence's mean next-token
NLL, ignoring positions whose label is the tokenizer's EOS id (the reference's ``ignore_index``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import ArchitectureAdapter
from .plan import PruningPlan
from .surgery import PrunableModel


@dataclass(frozen=True)
class LossSettings:
    ignore_index: int | None = None
    chunk_tokens: int = 1024
    batch_size: int = 2


def sequence_nll(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    normed_hidden: torch.Tensor,
    input_ids: torch.Tensor,
    settings: LossSettings,
) -> torch.Tensor:
    """Mean next-token NLL of each sequence, from final-normed hidden states, chunk by chunk."""
    hidden = normed_hidden[:, :-1].reshape(-1, normed_hidden.shape[-1])
    labels = input_ids[:, 1:].reshape(-1).to(hidden.device)
    nll = torch.empty(labels.shape, dtype=torch.float32, device=hidden.device)
    for start in range(0, labels.numel(), settings.chunk_tokens):
        stop = start + settings.chunk_tokens
        logits = adapter.logits_from_hidden(model, hidden[start:stop]).float()
        nll[start:stop] = F.cross_entropy(logits, labels[start:stop], reduction="none")
    nll = nll.view(input_ids.shape[0], -1)
    labels = labels.view(input_ids.shape[0], -1)
    if settings.ignore_index is None:
        return nll.mean(dim=1)
    mask = labels != settings.ignore_index
    return (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def perplexity_from_nll(per_sequence: torch.Tensor) -> float:
    return math.exp(per_sequence.mean().item())


class _LayerInputRecorder:
    """Forward pre-hooks that keep each decoder layer's input hidden states and keyword arguments."""

    def __init__(self, layers: nn.ModuleList):
        self.inputs: list[torch.Tensor | None] = [None] * len(layers)
        self.kwargs: list[dict] = [{} for _ in layers]
        self._handles = [
            layer.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, layer in enumerate(layers)
        ]

    def _hook(self, index: int) -> Callable:
        def record(module, args, kwargs):
            if args:
                self.inputs[index], self.kwargs[index] = args[0], dict(kwargs)
            else:
                kw = dict(kwargs)
                self.inputs[index], self.kwargs[index] = kw.pop("hidden_states"), kw

        return record

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class CalibrationScorer:
    """Scores plans on one calibration set; the model's current plan is the common base of all candidates."""

    def __init__(
        self,
        prunable: PrunableModel,
        tokens: torch.Tensor,
        settings: LossSettings,
        device: str | torch.device = "cpu",
    ):
        if tokens.ndim != 2 or tokens.shape[0] == 0:
            raise ValueError("calibration tokens must be a non-empty [sequences, seqlen] tensor")
        self.prunable = prunable
        self.tokens = tokens
        self.settings = settings
        self.device = torch.device(device)

    def _batches(self):
        for start in range(0, self.tokens.shape[0], self.settings.batch_size):
            yield self.tokens[start : start + self.settings.batch_size].to(self.device)

    @torch.inference_mode()
    def perplexity(self) -> float:
        """Perplexity of the model as it is now (one full forward per batch)."""
        p, model = self.prunable, self.prunable.model
        nlls = []
        for ids in self._batches():
            hidden = p.adapter.decoder(model)(input_ids=ids, use_cache=False).last_hidden_state
            nlls.append(sequence_nll(model, p.adapter, hidden, ids, self.settings))
        return perplexity_from_nll(torch.cat(nlls))

    def _run_tail(self, recorder: _LayerInputRecorder, first_layer: int, ids: torch.Tensor) -> torch.Tensor:
        p, model = self.prunable, self.prunable.model
        hidden = recorder.inputs[first_layer]
        for index in range(first_layer, p.layout.num_layers):
            out = p.adapter.layers(model)[index](hidden, **recorder.kwargs[index])
            hidden = out[0] if isinstance(out, tuple) else out
        normed = p.adapter.final_norm(model)(hidden)
        return sequence_nll(model, p.adapter, normed, ids, self.settings)

    @torch.inference_mode()
    def score(
        self,
        plans: Sequence[PruningPlan],
        first_layers: Sequence[int],
        on_batch: Callable[[int], None] | None = None,
    ) -> list[float]:
        """Perplexity of each plan; ``first_layers[k]`` is the first layer where plan k differs from the current one."""
        p, model = self.prunable, self.prunable.model
        nlls: list[list[torch.Tensor]] = [[] for _ in plans]
        layers = p.adapter.layers(model)
        for ids in self._batches():
            recorder = _LayerInputRecorder(layers)
            try:
                p.adapter.decoder(model)(input_ids=ids, use_cache=False)
            finally:
                recorder.remove()
            for k, (plan, first) in enumerate(zip(plans, first_layers, strict=True)):
                with p.trial(plan):
                    nlls[k].append(self._run_tail(recorder, first, ids))
                if on_batch:
                    on_batch(1)
            del recorder
        return [perplexity_from_nll(torch.cat(chunks)) for chunks in nlls]


@torch.inference_mode()
def full_forward_perplexity(model: nn.Module, tokens: torch.Tensor, settings: LossSettings) -> float:
    """The reference's way: full logits from ``model(ids)``, shifted cross entropy, per-sequence means.

    Used as the brute-force baseline in tests and benchmarks.
    """
    nlls = []
    for start in range(0, tokens.shape[0], settings.batch_size):
        ids = tokens[start : start + settings.batch_size]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1, :]
        labels = ids[:, 1:]
        ignore = settings.ignore_index if settings.ignore_index is not None else -100
        nll = F.cross_entropy(logits.permute(0, 2, 1).float(), labels, reduction="none", ignore_index=ignore)
        mask = labels != ignore
        nlls.append((nll * mask).sum(dim=1) / mask.sum(dim=1))
    return perplexity_from_nll(torch.cat(nlls))
