"""Closed-form weight compensation: refit each narrowed branch's output projection (no training).

After pruning, an MLP keeps its first ``k`` channels (they are the most important after reordering) and
an attention block its first query heads. Both branches end in a linear map (``down_proj``, ``o_proj``)
whose input ``x`` is, channel for channel, the full branch's input restricted to the kept channels. So the
full branch output ``y = W x_full`` can be re-approximated from the kept channels alone by ridge least
squares over calibration tokens:

    W' = argmin_W  sum_t ||W_full x_full(t) - W x_kept(t)||^2 + lambda ||W - W_kept||^2
       = (W_full G[:, :k] + lambda W_kept) (G[:k, :k] + lambda I)^-1,     G = sum_t x_full(t) x_full(t)^T

i.e. the removed channels are regressed onto the kept ones. Only the Gram matrix ``G`` (width x width,
float64) is accumulated, never the activations. ``lambda = damping * mean(diag(G[:k, :k]))``, a relative
damping as in GPTQ (default 0.01), keeps the solve well conditioned; Cholesky solves it. The damping pulls
towards the weights as they were (``W_kept = W_full[:, :k]``), not towards zero: then the refit can never
reconstruct the calibration outputs worse than plain pruning does (plain ridge did, measured on SmolLM2's
most narrowed layer), and a very large damping gives back plain pruning.

Layers are done in order, each on the hidden states the already-compensated pruned model produces
(sequential: later layers see the errors of earlier ones), attention before MLP within a layer. The
targets are the dense branch's outputs on those same inputs (a local reconstruction, FLAP/SlimGPT style).
No parameter is added: only the kept out-projection weights change, so the saved model keeps its shape.

Removed blocks (``blocks=True``, ReplaceMe-style): a removed branch leaves the residual stream as it was,
where the dense model added the branch's output. The kept branch just before it (a projection whose
output ``m`` is added straight to the residual ``r``) can absorb a linear map ``T`` (hidden x hidden):

    T = argmin_T  sum_t ||r + m T - y||^2 + lambda ||T - I||^2 = (M^T M + lambda I)^-1 (M^T (Y - R) + lambda I)

with ``y`` the dense removed branch(es) applied to ``r + m``. ``m T`` is ``x (T^T W)^T``, so ``T`` folds
into that projection's weight (and bias): no new parameter. Damping pulls towards ``T = I`` (no change).
Families that normalise a branch's output before adding it (Gemma 3) cannot fold a linear map this way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.plan import PruningPlan
from ..core.surgery import PrunableModel
from ..errors import UsageError
from ..search.calibration import draw_tokens
from ..search.recorder import LayerInputRecorder, layer_output
from ..settings import setting

log = logging.getLogger(__name__)


class CompensationError(UsageError):
    """Compensation cannot run as asked (the message says why and what to change)."""


@dataclass(frozen=True)
class CompensateSettings:
    # 0.1, measured on the main job's plan (docs/quality.md §4b): against 0.01 it fits the calibration mix less
    # closely and generalises better, WikiText-2 33.28 -> 32.94 and out-of-domain hellaswag-text 16.75 -> 16.50
    # (the plain pruned model: 36.18 / 16.69)
    damping: float = setting(
        0.1, help="ridge damping, relative to the mean diagonal of the kept channels' Gram matrix"
    )
    # 8,192 measured on SmolLM2's main job: the run's own 3,072 tokens made WikiText-2 worse (43.6 -> 45.0)
    # where 8,192 made it better (43.6 -> 39.2); a fold solves a hidden x hidden system (docs/quality.md §4)
    tokens: int = setting(
        8192,
        help="calibration tokens for compensation, drawn from the run's calibration source "
        "(0: reuse the run's own block and width sets)",
    )
    blocks: bool = setting(
        False,
        help="also stand in for each removed block: fold a least-squares linear map into the kept "
        "output projection just before it (ReplaceMe-style, no new parameters)",
    )

    def calibration_tokens(self, calibration, stored: dict | None, tokenizer) -> torch.Tensor:
        """Compensation's tokens: the run's stored block and width sets, or a fresh draw of ``tokens``."""
        if not self.tokens and stored is not None:
            return torch.cat([stored["width"], stored["block"]])
        budget = self.tokens or calibration.block_tokens + calibration.width_tokens
        return draw_tokens(
            calibration.calibration_dataset,
            tokenizer,
            tokens=budget,
            seqlen=calibration.seqlen,
            seed=calibration.seed,
        )

    def validate(self) -> None:
        if self.damping < 0:
            raise CompensationError(f"--damping must be 0 or more, got {self.damping}")
        if self.tokens < 0:
            raise CompensationError(
                f"--compensate-tokens must be 0 (the run's sets) or more, got {self.tokens}"
            )


@dataclass(frozen=True)
class BranchFit:
    """How well one refitted projection reproduces the dense branch (squared error summed over tokens)."""

    layer: int
    kind: str
    kept: int
    full: int
    error_before: float
    error_after: float


def _damped_solve(gram: torch.Tensor, rhs, damping: float, singular: str) -> torch.Tensor:
    """``(G + lambda I)^-1 rhs(lambda)`` by Cholesky, ``lambda = damping * mean(diag(G))`` (relative, as in GPTQ)."""
    lam = damping * gram.diagonal().mean().clamp(min=torch.finfo(torch.float64).tiny)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(gram + lam * eye)
    if info.item() != 0:
        raise CompensationError(f"{singular}; raise --damping above 0")
    return torch.cholesky_solve(rhs(lam, eye), factor)


def ridge_refit(w_full: torch.Tensor, gram: torch.Tensor, kept: int, damping: float) -> torch.Tensor:
    """``(W_full G[:, :k] + lambda W_kept) (G[:k,:k] + lambda I)^-1`` in float64 (see the module docstring)."""
    w_full = w_full.double()
    return _damped_solve(
        gram[:kept, :kept],
        lambda lam, eye: (w_full @ gram[:, :kept] + lam * w_full[:, :kept]).T,  # (k, out)
        damping,
        "the kept channels' Gram matrix is singular (some kept channels never activate on the "
        "calibration tokens)",
    ).T


def reconstruction_error(w_full: torch.Tensor, w: torch.Tensor, gram: torch.Tensor) -> float:
    """``sum_t ||W_full x_full - W x_kept||^2`` from the Gram matrix alone."""
    k = w.shape[1]
    w_full, w = w_full.double(), w.double()
    full = (w_full @ gram @ w_full.T).trace()
    cross = (w @ gram[:k, :] @ w_full.T).trace()
    kept = (w @ gram[:k, :k] @ w.T).trace()
    return float(full - 2 * cross + kept)


class _GramOfInput:
    """A forward pre-hook that adds ``x^T x`` of a linear layer's input to a float64 Gram matrix."""

    def __init__(self, linear: nn.Linear):
        width = linear.in_features
        self.gram = torch.zeros(width, width, dtype=torch.float64, device=linear.weight.device)
        self.tokens = 0
        self.handle = linear.register_forward_pre_hook(self._add)

    def _add(self, module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        self.gram += x.T @ x
        self.tokens += x.shape[0]

    def remove(self) -> None:
        self.handle.remove()


def _replay_into(target: nn.Module):
    """A pre-hook for the pruned branch that runs the dense (full-width) branch on the same input."""

    def hook(module, args, kwargs):
        target(*args, **kwargs)

    return hook


class Compensator:
    """Refits the narrowed branches of ``pruned`` (extracted from ``dense`` with ``plan``) in place."""

    def __init__(
        self, dense: PrunableModel, pruned: nn.Module, plan: PruningPlan, settings: CompensateSettings
    ):
        settings.validate()
        self.dense, self.pruned, self.plan, self.settings = dense, pruned, plan, settings
        self.adapter = dense.adapter
        self.fits: list[BranchFit] = []
        if settings.blocks:
            self._check_foldable()

    def _check_foldable(self) -> None:
        if self.adapter.branch_outputs_normed:
            raise CompensationError(
                f"--compensate-blocks: {type(self.dense.model).__name__} normalises its attention and mlp "
                "output before adding it to the residual, so no linear map can be folded into the "
                "projection before a removed block; compensate without it"
            )

    def _branch_order(self) -> list[tuple[int, str]]:
        return [(i, kind) for i in range(self.plan.num_layers) for kind in ("attention", "mlp")]

    def removed_after(self, layer: int, kind: str) -> list[tuple[int, str]]:
        """The removed branches that directly follow branch ``(layer, kind)``, in order."""
        order = self._branch_order()
        span = []
        for j, k in order[order.index((layer, kind)) + 1 :]:
            if j not in self.plan.removed(k):
                break
            span.append((j, k))
        return span

    def narrowed(self, kind: str, layer: int) -> bool:
        full = self.dense.layout.attention_width if kind == "attention" else self.dense.layout.mlp_width
        return layer not in self.plan.removed(kind) and self.plan.width(kind)[layer] < full

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        widest = max(
            [self.plan.mlp_width[i] for i in range(self.plan.num_layers) if self.narrowed("mlp", i)]
            + [
                self.plan.attention_width[i]
                for i in range(self.plan.num_layers)
                if self.narrowed("attention", i)
            ]
            + [0]
        )
        if self.settings.blocks and any(self.plan.removed(k) for k in ("attention", "mlp")):
            widest = max(widest, self.dense.layout.hidden_size)  # each fold solves a hidden x hidden system
        if tokens.numel() < widest:
            raise CompensationError(
                f"compensation has {tokens.numel()} calibration tokens but a kept width of {widest} channels: the "
                f"least-squares system is under-determined; give at least {4 * widest} tokens "
                "(prune --compensate-tokens, compensate --tokens)"
            )

    @torch.no_grad()
    def run(self, tokens: torch.Tensor, batch_size: int = 2, progress: bool = True) -> list[BranchFit]:
        self._check_tokens(tokens)
        self.dense.restore()
        a, pruned = self.adapter, self.pruned
        device = a.lm_head(pruned).weight.device
        batches = [tokens[s : s + batch_size].to(device) for s in range(0, tokens.shape[0], batch_size)]
        hidden, kwargs = self._layer_inputs(batches)
        layers = a.layers(pruned)
        for i in tqdm(range(len(layers)), desc="compensate", disable=not progress, leave=False):
            for kind in ("attention", "mlp"):
                if self.narrowed(kind, i):
                    self._refit(kind, i, hidden, kwargs)
                if self.settings.blocks and i not in self.plan.removed(kind):
                    span = self.removed_after(i, kind)
                    if span:
                        self._fold(kind, i, span, hidden, kwargs)
            hidden = [layer_output(layers[i](h, **kw[i])) for h, kw in zip(hidden, kwargs, strict=True)]
        return self.fits

    def _layer_inputs(self, batches):
        """Per batch: the pruned model's input to layer 0 and every layer's call arguments."""
        a, pruned = self.adapter, self.pruned
        hidden, kwargs = [], []
        for ids in batches:
            with LayerInputRecorder(a.layers(pruned)) as recorder:
                a.decoder(pruned)(input_ids=ids, use_cache=False)
            hidden.append(recorder.inputs[0])
            kwargs.append(recorder.kwargs)
        return hidden, kwargs

    def _refit(self, kind: str, i: int, hidden, kwargs) -> None:
        a = self.adapter
        pruned_layer, dense_layer = a.layers(self.pruned)[i], a.layers(self.dense.model)[i]
        names = a.branch(kind)
        out_name = a.o_proj if kind == "attention" else a.mlp_out_proj
        dense_branch = getattr(dense_layer, names.module)
        pruned_branch = getattr(pruned_layer, names.module)
        dense_out = getattr(dense_branch, out_name)
        gram = _GramOfInput(dense_out)
        replay = pruned_branch.register_forward_pre_hook(_replay_into(dense_branch), with_kwargs=True)
        try:
            for h, kw in zip(hidden, kwargs, strict=True):
                pruned_layer(h, **kw[i])
        finally:
            replay.remove()
            gram.remove()
        pruned_out = getattr(pruned_branch, out_name)
        kept = pruned_out.in_features
        w_new = ridge_refit(dense_out.weight, gram.gram, kept, self.settings.damping)
        fit = BranchFit(
            layer=i,
            kind=kind,
            kept=kept,
            full=dense_out.in_features,
            error_before=reconstruction_error(dense_out.weight, dense_out.weight[:, :kept], gram.gram),
            error_after=reconstruction_error(dense_out.weight, w_new, gram.gram),
        )
        # a new tensor, never an in-place write: the pruned model may share storage with the dense one
        pruned_out.weight = nn.Parameter(w_new.to(pruned_out.weight.dtype), requires_grad=False)
        self.fits.append(fit)
        log.debug("layer %d %s: error %.4g -> %.4g", i, kind, fit.error_before, fit.error_after)

    def _dense_branch(self, layer: int, kind: str, residual: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The residual after the dense model's ``(layer, kind)`` branch adds its output to ``residual``."""
        dense_layer = self.adapter.layers(self.dense.model)[layer]
        names = self.adapter.branch(kind)
        x = getattr(dense_layer, names.norms[0])(residual)
        module = getattr(dense_layer, names.module)
        out = layer_output(module(hidden_states=x, **kwargs)) if kind == "attention" else module(x)
        return residual + out

    def _fold(self, kind: str, i: int, span: list[tuple[int, str]], hidden, kwargs) -> None:
        a = self.adapter
        layer = a.layers(self.pruned)[i]
        names = a.branch(kind)
        branch = getattr(layer, names.module)
        proj = getattr(branch, a.o_proj if kind == "attention" else a.mlp_out_proj)
        d = proj.out_features
        gram = torch.zeros(d, d, dtype=torch.float64, device=proj.weight.device)
        cross = torch.zeros_like(gram)
        target_norm = 0.0
        seen: dict[str, torch.Tensor] = {}
        hooks = [
            getattr(layer, names.norms[0]).register_forward_pre_hook(
                lambda m, args: seen.__setitem__("residual", args[0])
            ),
            branch.register_forward_hook(lambda m, args, out: seen.__setitem__("out", layer_output(out))),
        ]
        try:
            for h, kw in zip(hidden, kwargs, strict=True):
                layer(h, **kw[i])
                residual, out = seen["residual"], seen["out"]
                target = residual + out
                for j, k in span:
                    target = self._dense_branch(j, k, target, kw[j])
                m = out.reshape(-1, d).double()
                wanted = (target - residual).reshape(-1, d).double()
                gram += m.T @ m
                cross += m.T @ wanted
                target_norm += float((wanted * wanted).sum())
        finally:
            for hook in hooks:
                hook.remove()
        transform = fold_transform(gram, cross, self.settings.damping)
        eye = torch.eye(d, dtype=torch.float64, device=gram.device)
        fit = BranchFit(
            layer=i,
            kind=f"{kind} (stands in for removed {', '.join(f'{k} {j}' for j, k in span)})",
            kept=d,
            full=d,
            error_before=fold_error(eye, gram, cross, target_norm),
            error_after=fold_error(transform, gram, cross, target_norm),
        )
        # m T = x W^T T = x (T^T W)^T: the map becomes part of the projection (new tensors, never in place)
        proj.weight = nn.Parameter(
            (transform.T @ proj.weight.double()).to(proj.weight.dtype), requires_grad=False
        )
        if proj.bias is not None:
            proj.bias = nn.Parameter(
                (proj.bias.double() @ transform).to(proj.bias.dtype), requires_grad=False
            )
        self.fits.append(fit)
        log.debug(
            "layer %d %s folds %s: error %.4g -> %.4g", i, kind, span, fit.error_before, fit.error_after
        )


def fold_transform(gram: torch.Tensor, cross: torch.Tensor, damping: float) -> torch.Tensor:
    """``T = (M^T M + lambda I)^-1 (M^T D + lambda I)``, ``lambda = damping * mean(diag(M^T M))``."""
    return _damped_solve(
        gram,
        lambda lam, eye: cross + lam * eye,
        damping,
        "the output of the projection before a removed block is rank-deficient on the calibration tokens",
    )


def fold_error(transform: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, target_norm: float) -> float:
    """``sum_t ||m T - d||^2`` from ``M^T M``, ``M^T D`` and ``sum ||d||^2`` alone."""
    return float((transform.T @ gram @ transform).trace() - 2 * (transform.T @ cross).trace() + target_norm)


def compensation_summary(fits: list[BranchFit], settings: CompensateSettings, tokens: torch.Tensor) -> dict:
    """What the plan records about a compensation: settings, tokens and how much error it removed."""
    before = sum(f.error_before for f in fits)
    after = sum(f.error_after for f in fits)
    return {
        "damping": settings.damping,
        "blocks": settings.blocks,
        "tokens": int(tokens.numel()),
        "branches": len(fits),
        "error_ratio": after / before if before else 1.0,
    }


def compensate(
    dense: PrunableModel,
    pruned: nn.Module,
    plan: PruningPlan,
    tokens: torch.Tensor,
    settings: CompensateSettings | None = None,
    batch_size: int = 2,
    progress: bool = True,
) -> list[BranchFit]:
    """Refit the out-projections of every narrowed branch of ``pruned`` (see the module docstring)."""
    return Compensator(dense, pruned, plan, settings or CompensateSettings()).run(
        tokens, batch_size, progress
    )
