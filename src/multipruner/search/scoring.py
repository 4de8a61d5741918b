"""Calibration perplexity of many candidate plans, computed exactly but without redundant work.

A candidate that changes layer ``i`` leaves the hidden states entering layer ``i`` untouched. So, per
calibration batch, one forward of the current model records every decoder layer's input and call
arguments (recorder.py), and each candidate re-runs only its *tail*, layers ``i..L-1``, from the recorded
input, through HF's own layer modules (tails.py). The loss of each sequence comes from the objective
(objective.py: the reference's mean next-token NLL).

The scorer below runs one step's loop (racing.py: exact, fast, or off) over a :class:`StepState`, with
these strategies, each in its own module:

* reuse.py: a candidate restarts from its own states of the last step where they are still valid;
* recordings.py: a step's recordings come from the last step's and its winner's states, not a forward;
* layer_major.py: tails run layer by layer, many candidates per layer call;
* head_bound.py: a lower bound on the loss rules candidates out before their LM head is paid;
* distributed.py: under torchrun, processes share the candidates and exchange their losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from ..core.plan import PruningPlan
from ..core.surgery import PrunableModel
from ..faults import crash_point
from .distributed import Workers, owned, share_batch, share_exact
from .head_bound import BOUND_MIN_CANDIDATES, lazy_heads, pay_heads, settle
from .layer_major import candidates_per_call, run_tails_layer_major
from .objective import (
    LossSettings,
    NllObjective,
    Objective,
    SequenceBound,
    perplexity_from_nll,
)
from .racing import RaceSettings, paired_survivors
from .ranking import Ranking
from .recordings import Recording, carried_over, record
from .reuse import SavedStates, StepReuse, keep_rule
from .screening import FinalistRule
from .step_state import StepState
from .tails import Tail, TailResult, run_tails_one_by_one


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
    # sequence_nll, or a lower bound on it where the candidate's LM head was never paid (a screen's far ones)
    sequence_lower: list[torch.Tensor] = field(default_factory=list)
    # with a ranking (ranking.py), each finished candidate's key; the step's choice is the lowest
    rank: list[float | None] | None = None

    def best(self) -> int:
        """Index of the lowest perplexity, or rank where ranked (the first one on ties)."""
        finished = [k for k, p in enumerate(self.ppl) if p is not None]
        order = self.ppl if self.rank is None else self.rank
        return min(finished, key=lambda k: (_nan_last(order[k]), k))


def _nan_last(value: float) -> float:
    return math.inf if math.isnan(value) else value


@dataclass
class _Step:
    """One call of :meth:`CalibrationScorer.score`: its candidates, and what the strategies fill."""

    plans: Sequence[PruningPlan]
    first_layers: Sequence[int]
    state: StepState
    reuse: StepReuse
    dtype_bytes: int  # of the model's weights and activations, for the memory budgets
    on_batch: Callable[[int], None] | None
    # every batch's recording fits the reuse budget: each batch is recorded once per step (exact racing
    # visits a batch twice), and the next step derives its recordings from these (recordings.py)
    keep_recordings: bool = False
    recordings: dict[int, Recording] = field(default_factory=dict)


class CalibrationScorer:
    """Scores plans on one calibration set; the model's current plan is the common base of all candidates."""

    def __init__(
        self,
        prunable: PrunableModel,
        tokens: torch.Tensor,
        settings: LossSettings,
        device: str | torch.device = "cpu",
        workers: Workers | None = None,
        objective: Objective | None = None,
        first_row: int = 0,
    ):
        if tokens.ndim != 2 or tokens.shape[0] == 0:
            raise ValueError("calibration tokens must be a non-empty [sequences, seqlen] tensor")
        self.prunable = prunable
        self.tokens = tokens
        self.settings = settings
        self.device = torch.device(device)
        self.workers = workers  # other processes scoring a share of each step's candidates (torchrun)
        self.objective = objective or NllObjective(prunable.model, prunable.adapter, settings)
        self.first_row = first_row  # of these tokens in the set the objective was made for (its targets)
        self._saved: SavedStates = {}  # each candidate's states from the last step (reuse.py)
        self.layers_run = 0  # decoder-layer forwards, for benchmarks
        self._recordings: dict[int, Recording] = {}  # the last step's, by batch (recordings.py)

    def part(self, rows: slice) -> CalibrationScorer:
        """A scorer on some of this set's sequences, with the same loss (a screening set: the first rows;
        the decision set's others). Its objective still reads this set's targets: rows are re-based."""
        return CalibrationScorer(
            self.prunable,
            self.tokens[rows],
            self.settings,
            self.device,
            self.workers,
            self.objective,
            first_row=self.first_row + (rows.start or 0),
        )

    def perplexity(self) -> float:
        """Perplexity of the model as it is now (one full forward per batch)."""
        return perplexity_from_nll(self.sequence_losses())

    @torch.inference_mode()
    def sequence_losses(self) -> torch.Tensor:
        """The model's loss per sequence as it is now (one full forward per batch)."""
        p, model = self.prunable, self.prunable.model
        nlls = []
        for b in range(len(self._batch_bounds())):
            ids = self._ids(b)
            hidden = p.adapter.decoder(model)(input_ids=ids, use_cache=False).last_hidden_state
            nlls.append(self.objective.per_sequence(hidden, ids, self._objective_rows(b)))
        return torch.cat(nlls)

    @torch.inference_mode()
    def score(
        self,
        plans: Sequence[PruningPlan],
        first_layers: Sequence[int],
        keys: Sequence[Hashable] | None = None,
        on_batch: Callable[[int], None] | None = None,
        race: RaceSettings | None = None,
        finalists: FinalistRule | None = None,
        carried: Sequence[torch.Tensor] | None = None,
        ranking: Ranking | None = None,
    ) -> StepScores:
        """Perplexity of each plan (None for a candidate eliminated by ``race``, or whose exact loss a
        screen for ``finalists`` did not need).

        ``first_layers[k]``: the first layer where plan k differs from the current plan. ``keys[k]``: an
        identity of the candidate that stays the same across steps (enables cross-step reuse).
        ``finalists``: a screen (with ``race`` off): every candidate is scored on every sequence, but only
        those that may be finalists pay their LM head; the others keep a lower bound
        (``StepScores.sequence_lower``), which already ranks them behind the finalists.
        ``carried[k]``: plan k's exact per-sequence losses on sequences before this scorer's (a screen's
        finalists, on the rows their decision set shares with the screen): they count in every sum,
        racing included, and in the perplexity, which is then over both.
        ``ranking``: how candidates are ordered, when not by their total loss (ranking.py).
        """
        race = race or RaceSettings(mode="off")
        if finalists is not None and race.mode != "off":
            raise ValueError("a screen scores every candidate on every sequence: give it no racing")
        if ranking is not None and (race.mode == "fast" or (finalists is not None and finalists.margin > 0)):
            raise ValueError("a ranking orders by cost-weighted totals: no paired test, no margin in nats")
        keys = list(keys) if keys is not None else [None] * len(plans)
        n_batches = len(self._batch_bounds())
        step = self._start_step(
            plans, first_layers, keys, on_batch, race, screening=finalists is not None, ranking=ranking
        )
        state = step.state
        for k, nll in enumerate(carried or []):
            state.carry(k, nll)
        alive = set(range(len(plans)))
        if race.mode == "exact" and len(plans) > 1:
            self._batch(step, 0, alive)
            # the best candidate after one batch is usually the winner: finish it first, then its total
            # bounds everyone else's partial sums
            leader = min(alive, key=lambda k: (state.lower_rank(k), k))
            for b in range(1, n_batches):
                self._batch(step, b, {leader})
            self._finish(step, leader)
            bound = state.rank(leader)
            for b in range(1, n_batches):
                alive = {leader} | state.may_win(alive - {leader}, bound)
                self._batch(step, b, alive - {leader})
            alive = {leader} | state.may_win(alive - {leader}, bound)
        else:
            for b in range(n_batches):
                self._batch(step, b, alive)
                seen = min(state.sequences_scored(k) for k in alive)
                if race.mode == "fast" and seen >= race.min_sequences and b < n_batches - 1:
                    for k in sorted(alive):
                        self._finish(step, k)
                    alive = paired_survivors({k: state.sequence_nll(k) for k in alive}, race.z)
        if finalists is None:
            settle(state, alive, lambda k: self._finish(step, k))
        else:  # the pick's margin is a mean over the sequences; settle compares totals
            within = finalists.margin * self.tokens.shape[0]
            settle(state, alive, lambda k: self._finish(step, k), top=finalists.top_k, within=within)
        self._saved = step.reuse.fresh  # candidates that are gone (chosen, or of another stage) free memory
        self._recordings = step.recordings
        return self._scores(state, n_batches, on_batch)

    def _start_step(
        self,
        plans,
        first_layers,
        keys,
        on_batch,
        race: RaceSettings,
        screening: bool,
        ranking: Ranking | None,
    ) -> _Step:
        """The step's state, with the choices its strategies make from the memory they may use."""
        p, settings = self.prunable, self.settings
        weights = next(p.model.parameters())
        dtype_bytes = weights.element_size()  # the one source of every memory budget's state sizes
        # under torchrun every process must decide alike, so each sizes the largest share, not its own
        busiest = len(first_layers) if self.workers is None else self.workers.largest_share(first_layers)
        lazy = lazy_heads(
            selecting=race.mode != "off" or screening,
            top_k=settings.head_bound_top_k,
            budget_mb=settings.head_bound_budget_mb,
            candidates=busiest,
            state_values=self.tokens.numel() * p.layout.hidden_size,
            dtype_bytes=dtype_bytes,
        )
        batch_values = settings.batch_size * self.tokens.shape[1] * p.layout.hidden_size
        keep = keep_rule(
            settings.reuse_budget_mb,
            p.layout.num_layers,
            first_layers,
            n_batches=len(self._batch_bounds()),
            state_mb=batch_values * dtype_bytes / 2**20,
        )
        recordings_mb = (
            len(self._batch_bounds()) * (p.layout.num_layers + 1) * batch_values * dtype_bytes / 2**20
        )
        return _Step(
            keep_recordings=recordings_mb <= settings.reuse_budget_mb,
            plans=plans,
            first_layers=first_layers,
            state=StepState(len(plans), lazy, weights.dtype, ranking),
            reuse=StepReuse(self._saved, plans, first_layers, keys, keep),
            dtype_bytes=dtype_bytes,
            on_batch=on_batch,
        )

    def _batch(self, step: _Step, b: int, members: set[int]) -> None:
        """Score the candidates ``members`` on batch ``b`` (one recording forward, then one tail each)."""
        if not members:
            return
        ids = self._ids(b)
        recording = self._recorded(step, b, ids)
        # with few members (the leader finishing its batches, a step's last finalists) the bound would cost
        # more LM-head work than it could spare
        bound = None
        if step.state.lazy and len(members) >= BOUND_MIN_CANDIDATES:
            current = recording.current(self.prunable)
            bound = self.objective.lower_bound(current, ids, self._objective_rows(b))
        mine = owned(self.workers, members, step.first_layers)
        tails = [step.reuse.tail_start(k, b, recording.inputs) for k in mine]
        results = self._run_tails(step, recording, tails, ids)
        for tail, (normed, kept) in zip(tails, results, strict=True):
            self._record_loss(step.state, tail.candidate, b, normed, ids, bound)
            step.reuse.keep_states(tail, b, kept)
            if step.on_batch and self.workers is None:
                step.on_batch(1)
        if self.workers is not None:
            share_batch(self.workers, step.state, b, mine)
            if step.on_batch:
                step.on_batch(len(members))

    def _recorded(self, step: _Step, b: int, ids: torch.Tensor) -> Recording:
        """Batch b's recording: kept from earlier in this step, derived from the last step's, or one
        forward of the current model."""
        if b in step.recordings:
            return step.recordings[b]
        recording = carried_over(self._recordings.get(b), self.prunable.plan, self._saved, b)
        if recording is None:
            recording = record(self.prunable, ids)
            self.layers_run += self.prunable.layout.num_layers
        if step.keep_recordings:
            step.recordings[b] = recording
        return recording

    def _run_tails(
        self, step: _Step, recording: Recording, tails: list[Tail], ids: torch.Tensor
    ) -> list[TailResult]:
        p, budget_mb = self.prunable, self.settings.layer_major_budget_mb
        if budget_mb > 0:
            chunk = candidates_per_call(p.layout, ids.shape, step.dtype_bytes, budget_mb)
            results, ran = run_tails_layer_major(
                p,
                recording.kwargs,
                tails,
                step.first_layers,
                step.plans,
                ids.shape[0],
                chunk,
                step.reuse.keep,
            )
        else:
            results, ran = run_tails_one_by_one(p, recording.kwargs, tails, step.plans, step.reuse.keep)
        self.layers_run += ran
        return results

    def _record_loss(
        self,
        state: StepState,
        k: int,
        b: int,
        normed: torch.Tensor,
        ids: torch.Tensor,
        bound: SequenceBound | None,
    ) -> None:
        """Candidate k's loss on batch b from its final states: exact, or bounded with its head put off."""
        if bound is None:
            state.record_exact(k, b, self.objective.per_sequence(normed, ids, self._objective_rows(b)))
        else:
            state.record_bound(k, b, bound(normed), normed)
        state.scored_here += 1
        crash_point("candidate_scored")

    def _finish(self, step: _Step, k: int) -> None:
        """Candidate k's exact loss on every batch it was scored on (its LM head, where it was put off).
        With torchrun every process calls it, in the same order; the one holding k's states computes."""
        state = step.state
        if k not in state.pending:
            return
        pay_heads(
            state,
            k,
            lambda b, normed: self.objective.per_sequence(normed, self._ids(b), self._objective_rows(b)),
        )
        if self.workers is not None:
            share_exact(self.workers, state, k)
        state.pending.discard(k)

    def _scores(self, state: StepState, n_batches: int, on_batch) -> StepScores:
        candidates = range(len(state))
        totals = [self.tokens.shape[0] + state.carried_sequences(k) for k in candidates]
        ppl = [
            math.exp(state.partial_sum(k) / totals[k]) if state.exact_sequences(k) == totals[k] else None
            for k in candidates
        ]
        skipped = sum(n_batches - state.batches_run(k) for k in candidates)
        if on_batch and skipped:
            on_batch(skipped)
        return StepScores(
            ppl=ppl,
            partial_ppl=[state.partial_ppl(k) for k in candidates],
            sequences=[state.sequences_scored(k) for k in candidates],
            sequence_nll=[state.sequence_nll(k) if state.nll[k] else torch.empty(0) for k in candidates],
            sequence_lower=[state.sequence_lower(k) for k in candidates],
            skipped_batches=skipped,
            total_batches=n_batches * len(state),
            bounded_batches=sum(state.batches_run(k) - state.exact_batches(k) for k in candidates),
            batches_by_process=None if self.workers is None else self.workers.all_gather(state.scored_here),
            rank=None
            if state.ranking is None
            else [state.rank(k) if p is not None else None for k, p in enumerate(ppl)],
        )

    def _ids(self, b: int) -> torch.Tensor:
        return self.tokens[self._batch_bounds()[b]].to(self.device)

    def _objective_rows(self, b: int) -> slice:
        """Batch b's rows in the set the objective was made for."""
        rows = self._batch_bounds()[b]
        return slice(self.first_row + rows.start, self.first_row + rows.stop)

    def _batch_bounds(self) -> list[slice]:
        size, rows = self.settings.batch_size, self.tokens.shape[0]
        return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]
