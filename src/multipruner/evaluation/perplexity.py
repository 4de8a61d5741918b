"""Perplexity on an evaluation text, as the papers compute it (WikiText-2 raw test, windows of 2048)."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.adapters import adapter_for
from ..errors import UsageError
from ..search.objective import LossSettings, perplexity_from_nll, sequence_nll


@torch.inference_mode()
def stream_perplexity(
    model: nn.Module,
    token_stream: torch.Tensor,
    seqlen: int = 2048,
    batch_size: int = 1,
    ignore_index: int | None = None,
    progress: bool = True,
) -> float:
    """exp(mean over non-overlapping windows of each window's mean NLL); a last partial window is dropped."""
    windows = token_stream.numel() // seqlen
    if windows == 0:
        raise UsageError(
            f"the text has {token_stream.numel()} tokens, fewer than one window of {seqlen}; use a longer text "
            "or a smaller --seqlen"
        )
    ids = token_stream[: windows * seqlen].view(windows, seqlen)
    adapter = adapter_for(model)
    settings = LossSettings(ignore_index=ignore_index, batch_size=batch_size)
    device = next(model.parameters()).device
    nlls = []
    for start in tqdm(range(0, windows, batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = ids[start : start + batch_size].to(device)
        hidden = adapter.decoder(model)(input_ids=batch, use_cache=False).last_hidden_state
        nlls.append(sequence_nll(model, adapter, hidden, batch, settings))
    return perplexity_from_nll(torch.cat(nlls))
