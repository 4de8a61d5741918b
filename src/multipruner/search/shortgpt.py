"""ShortGPT (Men et al. 2024, arXiv 2403.03853) as a baseline: remove whole layers in one shot.

A layer's Block Influence is ``BI_i = 1 - E[cos(x_i, x_{i+1})]``, the mean over calibration tokens of how
much the layer turns the hidden state it receives (``x_i``, the layer's input; ``x_{i+1}``, its output).
Layers with the lowest BI change the residual stream least; they are removed (attention and MLP block
together) in ascending BI order, computed once on the dense model, until the target ratio is reached.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..core.plan import PruningPlan
from ..core.surgery import PrunableModel
from .latency import LatencyTable
from .loop import StepRecord, initial_plan
from .settings import SearchSettings

log = logging.getLogger(__name__)


@torch.inference_mode()
def block_influence(
    prunable: PrunableModel, tokens: torch.Tensor, batch_size: int, device=None
) -> list[float]:
    """BI of every decoder layer of the model as it is now, averaged over all calibration tokens."""
    adapter, model = prunable.adapter, prunable.model
    layers = adapter.layers(model)
    # states[i]: the input of layer i; states[L]: the last layer's output (the final norm's input)
    states: list[torch.Tensor | None] = [None] * (len(layers) + 1)

    def keep(index: int):
        def hook(module, args, kwargs):
            states[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    modules = [*layers, adapter.final_norm(model)]
    handles = [m.register_forward_pre_hook(keep(i), with_kwargs=True) for i, m in enumerate(modules)]
    totals = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    try:
        for start in range(0, tokens.shape[0], batch_size):
            ids = tokens[start : start + batch_size].to(device or next(model.parameters()).device)
            adapter.decoder(model)(input_ids=ids, use_cache=False)
            for i in range(len(layers)):
                cos = F.cosine_similarity(states[i].float(), states[i + 1].float(), dim=-1)
                totals[i] += cos.double().sum().item()
            count += ids.numel()
    finally:
        for handle in handles:
            handle.remove()
    return [1.0 - t / count for t in totals.tolist()]


def without_layer(plan: PruningPlan, layer: int) -> PruningPlan:
    return plan.without_block("attention", layer).without_block("mlp", layer)


def run_shortgpt(
    prunable: PrunableModel,
    perplexity: Callable[[], float],
    tokens: torch.Tensor,
    settings: SearchSettings,
    *,
    batch_size: int = 2,
    done_steps: int = 0,
    on_step: Callable[[StepRecord, PruningPlan], None] | None = None,
    latency: LatencyTable | None = None,
) -> PruningPlan:
    """Remove the lowest-BI layers until the target ratio; ``perplexity()`` scores the model after each
    removal (for the record: the choice does not depend on it). ``done_steps`` finished steps are replayed."""
    layout = prunable.layout
    plan = initial_plan(layout, settings, prunable.channel_order)
    prunable.apply(plan)
    started = time.perf_counter()
    scores = block_influence(prunable, tokens, batch_size)
    order = sorted(range(layout.num_layers), key=lambda i: (scores[i], i))
    dtype_bytes = next(prunable.model.parameters()).element_size()
    cost = settings.cost(layout, dtype_bytes, latency)  # the budget the greedy search measures too
    target = settings.target.reduction(cost)
    ranking = [{"kind": "layer", "op": "remove", "layer": i, "bi": scores[i]} for i in order]
    log.info("block influence, lowest first: %s", ", ".join(f"L{i} {scores[i]:.4f}" for i in order[:8]))
    for step, layer in enumerate(order):
        if cost.reduction(plan) >= target:
            break
        if len(plan.removed_attention) == layout.num_layers - 1:
            log.warning("stopping at %.2f%%: one layer must keep its attention", plan.ratio(layout))
            break
        plan = without_layer(plan, layer)
        if step < done_steps:
            continue
        prunable.apply(plan)
        ppl = perplexity()
        record = StepRecord(
            step=step,
            stage="layer",
            candidates=ranking,
            choice={
                "kind": "layer",
                "op": "remove",
                "layer": layer,
                "width": None,
                "bi": scores[layer],
                "ppl": ppl,
            },
            ppl=ppl,
            ratio=plan.ratio(layout),
            params=plan.num_params(layout),
            elapsed_s=time.perf_counter() - started,
            plan=plan.to_dict(),
            measure=cost.measure,
            reduction=cost.reduction(plan),
        )
        log.info(
            "step %d [layer] remove layer %d (BI %.4f) -> ppl %.3f, ratio %.2f%%",
            step,
            layer,
            scores[layer],
            ppl,
            record.ratio,
        )
        if on_step:
            on_step(record, plan)
        started = time.perf_counter()
    prunable.apply(plan)
    return plan
