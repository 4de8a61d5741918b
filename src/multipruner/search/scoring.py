"""Calibration perplexity of many candidate plans, computed exactly but without redundant work.

A candidate that changes layer ``i`` leaves the hidden states entering layer ``i`` untouched. So, per
calibration batch, one forward of the current model records every decoder layer's input and call
arguments (mask, rotary tables: whatever the family passes), and each candidate re-runs only layers
``i..L-1`` from the recorded input, through HF's own layer modules. The loss is computed in chunks of
tokens, so the [tokens x vocab] logits tensor never exists whole (Gemma 3's vocabulary is 262k).

Perplexity follows the reference: exp of the mean over sequences of each sequence's mean next-token
NLL, ignoring positions whose label is the tokenizer's EOS id (the reference's ``ignore_index``), unless
that id is 0 (see :func:`ignored_label`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapters import ArchitectureAdapter
from .distributed import Workers
from ..faults import crash_point
from .head_bound import HeadBound
from ..core.plan import PruningPlan
from .racing import RaceSettings, exact_survivors, paired_survivors
from ..core.surgery import PrunableModel


@dataclass(frozen=True)
class LossSettings:
    ignore_index: int | None = None
    chunk_tokens: int = 1024
    batch_size: int = 2
    reuse_budget_mb: float = 2048.0  # hidden states kept between steps (0 disables cross-step reuse)
    # layer-major scoring: candidates whose tails reach a layer with the same modules pass it in one call,
    # up to this much activation memory per call (0: one candidate at a time)
    layer_major_budget_mb: float = 0.0
    # racing: rule candidates out with a lower bound on their loss from the labels and the current model's
    # top-k tokens per position (head_bound.py) before paying their full LM head; 0 disables it
    head_bound_top_k: int = 16
    # final hidden states kept per step until the candidates that may win get their exact loss
    head_bound_budget_mb: float = 2048.0


def ignored_label(tokenizer) -> int | None:
    """The label left out of the loss, as the reference picks it: the EOS id, but none when that id is 0
    (its ``if pad_token_id:`` test treats 0 as "no id")."""
    return getattr(tokenizer, "eos_token_id", None) or None


def first_difference(a: PruningPlan, b: PruningPlan) -> int:
    """The first layer where two plans build different modules (the number of layers if none)."""
    for i in range(a.num_layers):
        for kind in ("attention", "mlp"):
            removed = i in a.removed(kind)
            if removed != (i in b.removed(kind)) or (not removed and a.width(kind)[i] != b.width(kind)[i]):
                return i
    return a.num_layers


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
    return per_sequence_mean(nll, input_ids, settings)


def per_sequence_mean(
    token_nll: torch.Tensor, input_ids: torch.Tensor, settings: LossSettings
) -> torch.Tensor:
    """Each sequence's mean over its positions (flattened in ``token_nll``), leaving out ignored labels."""
    nll = token_nll.view(input_ids.shape[0], -1)
    if settings.ignore_index is None:
        return nll.mean(dim=1)
    mask = input_ids[:, 1:].to(nll.device) != settings.ignore_index
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


def _layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _repeat_batch(value, times: int, batch: int):
    """Call arguments for ``times`` stacked copies of a batch: batch-leading tensors repeated along dim 0
    (masks, rotary tables, position ids); anything else, such as a 1-D cache position, as it is."""
    if times == 1:
        return value
    if isinstance(value, torch.Tensor):
        return (
            value.repeat(times, *([1] * (value.ndim - 1)))
            if value.ndim >= 2 and value.shape[0] == batch
            else value
        )
    if isinstance(value, tuple | list):
        return type(value)(_repeat_batch(v, times, batch) for v in value)
    if isinstance(value, dict):
        return {key: _repeat_batch(v, times, batch) for key, v in value.items()}
    return value


class CalibrationScorer:
    """Scores plans on one calibration set; the model's current plan is the common base of all candidates.

    Besides the per-step record of layer inputs, it keeps, for each candidate, the hidden states its
    last evaluation produced (within ``reuse_budget_mb``). When the candidate comes back at the next
    step, those states stay valid up to the first layer where its new plan differs from its old one
    (the layer the last step changed), so it restarts there instead of at its own layer. Every number
    is what a full forward would compute: only work whose inputs are unchanged is skipped.
    """

    def __init__(
        self,
        prunable: PrunableModel,
        tokens: torch.Tensor,
        settings: LossSettings,
        device: str | torch.device = "cpu",
        workers: Workers | None = None,
    ):
        if tokens.ndim != 2 or tokens.shape[0] == 0:
            raise ValueError("calibration tokens must be a non-empty [sequences, seqlen] tensor")
        self.prunable = prunable
        self.tokens = tokens
        self.settings = settings
        self.device = torch.device(device)
        self.workers = workers  # other processes scoring a share of each step's candidates (torchrun)
        # candidate key -> (its plan, {batch: {layer index: hidden states entering that layer}})
        self._saved: dict[Hashable, tuple[PruningPlan, dict[int, dict[int, torch.Tensor]]]] = {}
        self.layers_run = 0  # decoder-layer forwards, for benchmarks

    @torch.inference_mode()
    def perplexity(self) -> float:
        """Perplexity of the model as it is now (one full forward per batch)."""
        p, model = self.prunable, self.prunable.model
        nlls = []
        for bounds in self._batch_bounds():
            ids = self.tokens[bounds].to(self.device)
            hidden = p.adapter.decoder(model)(input_ids=ids, use_cache=False).last_hidden_state
            nlls.append(sequence_nll(model, p.adapter, hidden, ids, self.settings))
        return perplexity_from_nll(torch.cat(nlls))

    def _run_tail(
        self,
        recorder: _LayerInputRecorder,
        hidden: torch.Tensor,
        start: int,
        keep: Callable[[int], bool],
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The candidate's final-normed hidden states from layer ``start`` on, and the layer inputs kept."""
        p, model = self.prunable, self.prunable.model
        kept: dict[int, torch.Tensor] = {}
        for index in range(start, p.layout.num_layers):
            if index > start and keep(index):
                kept[index] = hidden
            hidden = _layer_output(p.adapter.layers(model)[index](hidden, **recorder.kwargs[index]))
            self.layers_run += 1
        return p.adapter.final_norm(model)(hidden), kept

    def _run_tails_layer_major(
        self,
        recorder: _LayerInputRecorder,
        tails: list,
        first_layers: Sequence[int],
        plans: Sequence[PruningPlan],
        batch_shape: torch.Size,
        keep: Callable[[int], bool],
    ) -> list[tuple[torch.Tensor, dict[int, torch.Tensor]]]:
        """What ``_run_tail`` gives for each tail, layer by layer instead of candidate by candidate.

        A candidate changes only its own layer, so past it every candidate's tail runs the current plan's
        modules: at each layer, the hidden states of all candidates already past their own layer are
        concatenated along the batch and go through that layer in one call (chunked by
        ``layer_major_budget_mb``); a candidate's own layer runs alone, under its plan.
        """
        p, model = self.prunable, self.prunable.model
        layers, n_layers = p.adapter.layers(model), p.layout.num_layers
        batch = batch_shape[0]
        dtype_bytes = next(model.parameters()).element_size()
        per_candidate_mb = batch * batch_shape[1] * self._activation_width() * dtype_bytes / 2**20
        chunk = max(1, int(self.settings.layer_major_budget_mb // per_candidate_mb))
        kept: dict[int, dict[int, torch.Tensor]] = {k: {} for k, *_ in tails}
        starting: dict[int, list] = {}
        for k, start, hidden, _ in tails:
            starting.setdefault(start, []).append((k, hidden))
        active: list[tuple[int, torch.Tensor]] = []  # (candidate, state entering the current layer)
        for index in range(min(starting, default=n_layers), n_layers):
            shared = []
            for k, hidden in active:
                if keep(index):
                    kept[k][index] = hidden
                shared.append((k, hidden))
            passed = []
            for k, hidden in starting.get(index, []):
                if first_layers[k] == index:  # its own layer: alone, under its plan
                    with p.trial(plans[k]):
                        passed.append((k, _layer_output(layers[index](hidden, **recorder.kwargs[index]))))
                    self.layers_run += 1
                else:  # restarting past its own layer from saved states: the shared modules from here
                    shared.append((k, hidden))
            for lo in range(0, len(shared), chunk):
                group = shared[lo : lo + chunk]
                kwargs = _repeat_batch(recorder.kwargs[index], len(group), batch)
                out = _layer_output(layers[index](torch.cat([h for _, h in group]), **kwargs))
                passed.extend((k, h) for (k, _), h in zip(group, out.split(batch), strict=True))
                self.layers_run += len(group)
            active = passed
        finals = dict(active)
        return [(p.adapter.final_norm(model)(finals[k]), kept[k]) for k, *_ in tails]

    def _activation_width(self) -> int:
        """Widest per-token activation inside a layer (hidden, MLP intermediate, or q/k/v rows)."""
        layout = self.prunable.layout
        return max(
            layout.hidden_size,
            2 * layout.mlp_width,
            layout.attention_width + 2 * layout.num_kv_heads * layout.head_dim,
        )

    def _keep_rule(self, first_layers: Sequence[int], batch_tokens: int) -> Callable[[int], bool]:
        """Which layers' inputs to keep for reuse: all of them, or every k-th to stay within the budget."""
        if self.settings.reuse_budget_mb <= 0:
            return lambda index: False
        n_layers = self.prunable.layout.num_layers
        dtype_bytes = next(self.prunable.model.parameters()).element_size()
        state_mb = batch_tokens * self.prunable.layout.hidden_size * dtype_bytes / 2**20
        n_batches = -(-self.tokens.shape[0] // self.settings.batch_size)
        wanted = sum(n_layers - 1 - f for f in first_layers) * n_batches * state_mb
        stride = max(1, math.ceil(wanted / self.settings.reuse_budget_mb))
        return lambda index: index % stride == 0

    def _lazy_heads(self, race: RaceSettings, first_layers: Sequence[int]) -> bool:
        """Whether this step bounds candidates' losses first and pays the full LM head only for those that
        may win: racing on, and the final states one process keeps within ``head_bound_budget_mb``.
        Under torchrun every process must decide alike, so each sizes the largest share, not its own."""
        if race.mode == "off" or self.settings.head_bound_top_k <= 0:
            return False
        n_candidates = len(first_layers) if self.workers is None else self.workers.largest_share(first_layers)
        p = self.prunable
        dtype_bytes = next(p.model.parameters()).element_size()
        states_mb = n_candidates * self.tokens.numel() * p.layout.hidden_size * dtype_bytes / 2**20
        return states_mb <= self.settings.head_bound_budget_mb

    def _batch_bounds(self) -> list[slice]:
        size = self.settings.batch_size
        return [slice(start, start + size) for start in range(0, self.tokens.shape[0], size)]

    @torch.inference_mode()
    def score(
        self,
        plans: Sequence[PruningPlan],
        first_layers: Sequence[int],
        keys: Sequence[Hashable] | None = None,
        on_batch: Callable[[int], None] | None = None,
        race: RaceSettings | None = None,
    ) -> StepScores:
        """Perplexity of each plan (None for a candidate eliminated by ``race``).

        ``first_layers[k]``: the first layer where plan k differs from the current plan. ``keys[k]``: an
        identity of the candidate that stays the same across steps (enables cross-step reuse).
        """
        race = race or RaceSettings(mode="off")
        keys = list(keys) if keys is not None else [None] * len(plans)
        batches = self._batch_bounds()
        run = _StepRun(self, plans, first_layers, keys, on_batch, lazy=self._lazy_heads(race, first_layers))
        alive = set(range(len(plans)))
        if race.mode == "exact" and len(plans) > 1:
            run.batch(0, alive)
            # the best candidate after one batch is usually the winner: finish it first, then its total
            # bounds everyone else's partial sums
            leader = min(alive, key=lambda k: (run.lower_sum(k), k))
            for b in range(1, len(batches)):
                run.batch(b, {leader})
            run.finish(leader)
            bound = run.partial_sum(leader)
            for b in range(1, len(batches)):
                alive = {leader} | run.may_win(alive - {leader}, bound)
                run.batch(b, alive - {leader})
            alive = {leader} | run.may_win(alive - {leader}, bound)
        else:
            for b in range(len(batches)):
                run.batch(b, alive)
                seen = min(run.sequences_scored(k) for k in alive)
                if race.mode == "fast" and seen >= race.min_sequences and b < len(batches) - 1:
                    for k in sorted(alive):
                        run.finish(k)
                    alive = paired_survivors({k: run.sequence_nll(k) for k in alive}, race.z)
        run.settle(alive)
        self._saved = run.fresh  # candidates that are gone (chosen, or of another stage) free their memory
        total = self.tokens.shape[0]
        ppl = [
            math.exp(run.partial_sum(k) / total) if run.exact_sequences(k) == total else None
            for k in range(len(plans))
        ]
        skipped = sum(len(batches) - len(run.lower[k]) for k in range(len(plans)))
        if on_batch and skipped:
            on_batch(skipped)
        return StepScores(
            ppl=ppl,
            partial_ppl=[run.partial_ppl(k) for k in range(len(plans))],
            sequences=[run.sequences_scored(k) for k in range(len(plans))],
            sequence_nll=[run.sequence_nll(k) if run.nll[k] else torch.empty(0) for k in range(len(plans))],
            skipped_batches=skipped,
            total_batches=len(batches) * len(plans),
            bounded_batches=sum(len(run.lower[k]) - len(run.nll[k]) for k in range(len(plans))),
            batches_by_process=None if self.workers is None else self.workers.all_gather(run.scored_here),
        )


@dataclass(frozen=True)
class StepScores:
    """What one step's scoring found: full-set perplexity of each surviving candidate."""

    ppl: list[float | None]  # None: eliminated before its exact loss on every sequence
    # perplexity on the sequences each candidate was scored on; for one ruled out by the head bound, a
    # lower bound on it
    partial_ppl: list[float]
    sequences: list[int]  # sequences each candidate was scored on
    sequence_nll: list[torch.Tensor]  # each candidate's mean NLL per sequence scored, in sequence order
    skipped_batches: int  # candidate-batches not run thanks to racing
    total_batches: int
    bounded_batches: int = 0  # candidate-batches run whose full LM head the head bound made unnecessary
    batches_by_process: list[int] | None = None  # with torchrun: candidate-batches each process ran

    def best(self) -> int:
        """Index of the lowest perplexity (the first one on ties)."""
        finished = [k for k, p in enumerate(self.ppl) if p is not None]
        return min(finished, key=lambda k: (_nan_last(self.ppl[k]), k))


def _nan_last(value: float) -> float:
    return math.inf if math.isnan(value) else value


class _StepRun:
    """Per-step bookkeeping of the scorer: per-candidate losses by batch, and states kept for reuse.

    ``lower[k][b]``: candidate k's per-sequence loss on batch b, or a lower bound on it while only its tail
    has run (``lazy``: the exact loss waits in ``nll`` until :meth:`finish` pays its LM head).
    """

    def __init__(self, scorer: CalibrationScorer, plans, first_layers, keys, on_batch, lazy: bool = False):
        self.scorer, self.plans, self.first_layers, self.keys = scorer, plans, first_layers, keys
        self.on_batch = on_batch
        self.lazy = lazy
        self.bounds = scorer._batch_bounds()
        self.nll: list[dict[int, torch.Tensor]] = [{} for _ in plans]
        self.lower: list[dict[int, torch.Tensor]] = [{} for _ in plans]
        self.final_states: list[dict[int, torch.Tensor]] = [{} for _ in plans]  # lazy: awaiting the head
        self.pending: set[int] = set()  # candidates with a bounded batch (every process knows them)
        self.saved = {k: scorer._saved.get(k) for k in keys if k is not None}
        self.fresh: dict[Hashable, tuple[PruningPlan, dict[int, dict]]] = {
            k: (plan, {}) for k, plan in zip(keys, plans, strict=True) if k is not None
        }
        batch_tokens = scorer.settings.batch_size * scorer.tokens.shape[1]
        self.keep = scorer._keep_rule(first_layers, batch_tokens)
        self.scored_here = 0  # candidate-batches this process ran
        # bounds are rounded like the losses they bound: compare them with room for that
        dtype = next(scorer.prunable.model.parameters()).dtype
        self.margin = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-3

    def batch(self, b: int, members) -> None:
        """Score the candidates ``members`` on batch ``b`` (one recording forward, then one tail each)."""
        if not members:
            return
        scorer = self.scorer
        p, model = scorer.prunable, scorer.prunable.model
        ids = scorer.tokens[self.bounds[b]].to(scorer.device)
        layers = p.adapter.layers(model)
        recorder = _LayerInputRecorder(layers)
        try:
            current = p.adapter.decoder(model)(input_ids=ids, use_cache=False).last_hidden_state
            scorer.layers_run += len(layers)
        finally:
            recorder.remove()
        settings = scorer.settings
        bound = (
            HeadBound.from_current(
                model, p.adapter, current, ids, settings.head_bound_top_k, settings.chunk_tokens
            )
            # a lone member (the leader finishing its batches) is finished anyway: its bound would cost
            # more LM-head work than it could spare
            if self.lazy and len(members) > 1
            else None
        )
        workers = scorer.workers
        mine = [k for k in sorted(members) if workers is None or workers.owns(self.first_layers[k])]
        tails = [self._tail_start(k, b, recorder) for k in mine]
        if settings.layer_major_budget_mb > 0:
            results = scorer._run_tails_layer_major(
                recorder, tails, self.first_layers, self.plans, ids.shape, self.keep
            )
        else:
            results = []
            for k, start, hidden, _ in tails:
                with p.trial(self.plans[k]):
                    results.append(scorer._run_tail(recorder, hidden, start, self.keep))
        for (k, start, _, reusable), (normed, kept) in zip(tails, results, strict=True):
            if bound is None:
                self.nll[k][b] = self.lower[k][b] = sequence_nll(model, p.adapter, normed, ids, settings)
            else:
                self.lower[k][b] = per_sequence_mean(bound.token_nll(normed), ids, settings)
                self.final_states[k][b] = normed
                self.pending.add(k)
            self.scored_here += 1
            crash_point("candidate_scored")
            if self.keys[k] is not None:
                self.fresh[self.keys[k]][1][b] = {**{m: h for m, h in reusable.items() if m <= start}, **kept}
            if self.on_batch and workers is None:
                self.on_batch(1)
        if workers is not None:  # every process ends the batch with every member's losses (or bounds)
            for share in workers.all_gather({k: (self.lower[k][b].cpu(), b in self.nll[k]) for k in mine}):
                for k, (lower, exact) in share.items():
                    self.lower[k][b] = lower
                    if exact:
                        self.nll[k][b] = lower
                    else:
                        self.pending.add(k)
            if self.on_batch:
                self.on_batch(len(members))

    def finish(self, k: int) -> None:
        """Candidate k's exact loss on every batch it was scored on (its LM head, where it was put off).
        With torchrun every process calls it, in the same order; the one holding k's states computes."""
        if k not in self.pending:
            return
        scorer = self.scorer
        p, model = scorer.prunable, scorer.prunable.model
        for b, normed in sorted(self.final_states[k].items()):
            ids = scorer.tokens[self.bounds[b]].to(scorer.device)
            self.nll[k][b] = self.lower[k][b] = sequence_nll(model, p.adapter, normed, ids, scorer.settings)
        self.final_states[k].clear()
        if scorer.workers is not None:
            for share in scorer.workers.all_gather({b: nll.cpu() for b, nll in self.nll[k].items()}):
                for b, nll in share.items():
                    self.nll[k].setdefault(b, nll)
                    self.lower[k][b] = self.nll[k][b]
        self.pending.discard(k)

    def may_win(self, candidates, bound: float) -> set[int]:
        """The candidates whose loss so far (or its lower bound) does not yet exceed a finished total."""
        slack = self.margin * abs(bound) if self.lazy else 0.0
        return exact_survivors({k: self.lower_sum(k) for k in candidates}, bound + slack)

    def settle(self, alive: set[int]) -> None:
        """Exact totals for every candidate in ``alive`` that may still win, lowest bound first; the others
        keep their bound (they are provably worse than the best total found)."""
        best = min((self.partial_sum(k) for k in alive if k not in self.pending), default=math.inf)
        for k in sorted(alive, key=lambda k: (self.lower_sum(k), k)):
            if k not in self.pending:
                continue
            if best < math.inf and not self.may_win({k}, best):
                break
            self.finish(k)
            best = min(best, self.partial_sum(k))

    def _tail_start(self, k: int, b: int, recorder: _LayerInputRecorder):
        """``(k, first layer to run, its input, reusable saved states)``: from the recorded input of the
        candidate's own layer, or later from its states of the last step that are still valid."""
        plan, key = self.plans[k], self.keys[k]
        start, hidden, reusable = self.first_layers[k], recorder.inputs[self.first_layers[k]], {}
        if self.saved.get(key) is not None:
            old_plan, old_states = self.saved[key]
            valid_until = first_difference(plan, old_plan)
            reusable = {m: h for m, h in old_states.get(b, {}).items() if m <= valid_until}
            if reusable and max(reusable) > start:
                start = max(reusable)
                hidden = reusable[start]
        return k, start, hidden, reusable

    def sequence_nll(self, k: int) -> torch.Tensor:
        """Candidate k's exact per-sequence losses, in sequence order (empty while only bounded)."""
        if not self.nll[k]:
            return torch.empty(0)
        return torch.cat([self.nll[k][b] for b in sorted(self.nll[k])])

    def sequences_scored(self, k: int) -> int:
        return sum(t.numel() for t in self.lower[k].values())

    def exact_sequences(self, k: int) -> int:
        return sum(t.numel() for t in self.nll[k].values())

    def partial_sum(self, k: int) -> float:
        # float64, in batch order: the same sum whichever rule reads it, so comparisons are consistent
        return sum(self.nll[k][b].double().sum().item() for b in sorted(self.nll[k]))

    def lower_sum(self, k: int) -> float:
        """The loss so far, or a lower bound on it where a batch's LM head is still put off."""
        return sum(self.lower[k][b].double().sum().item() for b in sorted(self.lower[k]))

    def partial_ppl(self, k: int) -> float:
        n = self.sequences_scored(k)
        return math.exp(self.lower_sum(k) / n) if n else math.inf


@torch.inference_mode()
def full_forward_perplexity(model: nn.Module, tokens: torch.Tensor, settings: LossSettings) -> float:
    """The reference's way: full logits from ``model(ids)``, shifted cross entropy, per-sequence means.

    Used as the brute-force baseline in tests and benchmarks.
    """
    nlls = []
    device = next(model.parameters()).device  # batches go where the weights are, as the scorer's do
    for start in range(0, tokens.shape[0], settings.batch_size):
        ids = tokens[start : start + settings.batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1, :]
        labels = ids[:, 1:]
        ignore = settings.ignore_index if settings.ignore_index is not None else -100
        nll = F.cross_entropy(logits.permute(0, 2, 1).float(), labels, reduction="none", ignore_index=ignore)
        mask = labels != ignore
        nlls.append((nll * mask).sum(dim=1) / mask.sum(dim=1))
    return perplexity_from_nll(torch.cat(nlls))
