"""Screen, then decide: rank every candidate of a step cheaply, then choose among the few that may win on a
large decision set.

Exact scoring spends the same compute on every candidate, although most of them cannot win; so the sets
stay small, and a choice made on a small set fits its noise (docs/quality.md §1). Here every candidate is
*screened* (scored on the first sequences of its stage's calibration set, or, for width steps, ranked
by a proxy that needs no forward per candidate), and only the *finalists* are scored on the whole set,
the *decision set*, where the step's choice is made. A forward screen has already scored them exactly on
the first rows, so they carry those losses over and run only the decision set's other rows. A screen
pays the LM head only for the candidates that may be finalists (head_bound.settle); the others keep a
lower bound, which ranks them behind. With every candidate a finalist the choice is the one exact
scoring on the decision set makes.

Finalists: the ``top_k`` best on the screen, plus (``margin`` > 0) every candidate whose mean paired
difference to the screening leader, over the same sequences, is at most ``margin`` nats.

The proxy (``width_proxy_scores``): a width step drops the last ``group`` channels of one branch, so what it
takes away from the residual stream is those channels' share of the branch output, ``X_G W_G^T``. Its
mean squared size over the screening tokens, relative to the size of the residual stream entering the
layer, ranks the candidates; one forward of the current model measures it for every layer at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the settings import this module, and the stages import the settings
    from ..core.surgery import PrunableModel
    from .ranking import Ranking
    from .stages import Candidate

SCREENS = ("forward", "proxy")


@dataclass(frozen=True)
class FinalistRule:
    """Which screened candidates go on to the decision set."""

    top_k: int
    margin: float = 0.0  # nats per sequence; 0: the top k only

    def pick(self, screen_loss: Sequence[torch.Tensor], ranking: Ranking | None = None) -> list[int]:
        """Finalists, in candidate order, from each candidate's loss per screening sequence (the same
        sequences for all; a proxy gives one number per candidate), ordered by ``ranking`` where given
        (ranking.py). The screening leader is always one."""
        if ranking is None:
            means = [_nan_last(t.double().mean().item()) for t in screen_loss]
        else:
            means = [_nan_last(ranking.key(k, t.double().sum().item())) for k, t in enumerate(screen_loss)]
        ranked = sorted(range(len(means)), key=lambda k: (means[k], k))
        chosen = set(ranked[: self.top_k])
        if self.margin > 0:
            leader = screen_loss[ranked[0]].double()
            for k, loss in enumerate(screen_loss):
                if _nan_last((loss.double() - leader).mean().item()) <= self.margin:
                    chosen.add(k)
        return sorted(chosen)


def _nan_last(value: float) -> float:
    return math.inf if math.isnan(value) else value


@torch.inference_mode()
def width_proxy_scores(
    prunable: PrunableModel,
    candidates: Sequence[Candidate],
    tokens: torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> list[torch.Tensor]:
    """For each width candidate, the mean squared size of what its dropped channels add to their branch
    output, relative to the residual stream entering its layer, on ``tokens`` (lower: safer to drop).

    One forward of the model as it is now (the step's base plan applied): hooks on the output
    projections of the candidates' branches keep the dropped channels' inputs and compute their share.
    """
    adapter, model = prunable.adapter, prunable.model
    layers = adapter.layers(model)
    dropped = {}  # output projection -> (candidate index, its dropped input channels)
    for k, c in enumerate(candidates):
        if c.op != "shrink":
            raise ValueError(f"the proxy screen ranks width candidates only, not {c.kind} {c.op}")
        branch = getattr(layers[c.layer], adapter.branch(c.kind).module)
        dropped[getattr(branch, adapter.output_projection(c.kind))] = (k, c.width)
    removed = torch.zeros(len(candidates), dtype=torch.float64)
    stream = torch.zeros(len(candidates), dtype=torch.float64)
    layer_of = {c.layer: k for k, c in enumerate(candidates)}

    def on_output_input(module, args):
        k, kept = dropped[module]
        x = args[0][..., kept:]
        share = x @ module.weight[:, kept:].T
        removed[k] += share.double().pow(2).sum().item()

    def on_layer_input(index):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            for k in [k for k, c in enumerate(candidates) if c.layer == index]:
                stream[k] += hidden.double().pow(2).sum().item()

        return hook

    hooks = [out.register_forward_pre_hook(on_output_input) for out in dropped]
    hooks += [
        layers[i].register_forward_pre_hook(on_layer_input(i), with_kwargs=True) for i in sorted(layer_of)
    ]
    try:
        for start in range(0, tokens.shape[0], batch_size):
            ids = tokens[start : start + batch_size].to(device)
            adapter.decoder(model)(input_ids=ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return [(removed[k] / stream[k].clamp(min=1e-30)).reshape(1).float() for k in range(len(candidates))]
