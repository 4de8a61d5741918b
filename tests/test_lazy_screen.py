"""Lazy screening (``--rescreen``): a step re-screens the candidates that may be finalists and carries the
others' keys; when no key falls between screens it picks the finalists a full screen picks, and a
resumed run screens as the uninterrupted one."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from tqdm import tqdm

from multipruner import PrunableModel
from multipruner.search.lazy_screen import StaleKeys, forward_screen
from multipruner.search.loop import run_search
from multipruner.search.objective import LossSettings
from multipruner.search.ranking import Ranking
from multipruner.search.scoring import CalibrationScorer
from multipruner.search.settings import SearchConfigError, SearchSettings
from multipruner.search.stages import Candidate


class _TableScorer:
    """Scores candidates from a table of per-sequence losses; records who was scored."""

    def __init__(self, losses: dict, rows: int = 4):
        self.losses, self.scored = losses, []
        self.tokens = torch.zeros(rows, 8, dtype=torch.long)
        self.settings = SimpleNamespace(batch_size=2)

    def score(self, plans, first_layers, keys, on_batch, finalists, ranking):
        self.scored.extend(keys)
        lower = [self.losses[c] for c in keys]
        return SimpleNamespace(sequence_lower=lower, sequence_nll=lower, ppl=[1.0] * len(keys))


def _candidates(n_layers: int) -> list[Candidate]:
    return [Candidate(kind, "shrink", i, 8) for kind in ("mlp", "attention") for i in range(n_layers)]


def _settings(**kw) -> SearchSettings:
    return SearchSettings(**{"distribution": "auto", "finalists": 3, "rescreen": 4, **kw})


@pytest.mark.parametrize("seed", range(20))
def test_when_no_key_falls_the_lazy_screen_picks_the_full_screens_finalists(seed):
    rng = random.Random(seed)
    candidates = _candidates(12)
    saved = tuple(rng.choice([1.0, 2.0, 5.0]) for _ in candidates)
    ranking = Ranking(0.0, saved)
    old = {c: rng.uniform(0, 4) for c in candidates}
    # the lazy greedy's assumption: a key only rises between screens (by a lot, for some)
    new_total = {c: (old[c] + rng.choice([0.0, 0.1, 3.0])) * saved[k] for k, c in enumerate(candidates)}
    losses = {i: torch.tensor([t / 4] * 4, dtype=torch.float64) for i, t in new_total.items()}
    record = [{**c.to_dict(), "screen_key": old[c], "screened_at": 0} for c in candidates]
    stale = StaleKeys.from_record(record, {"layer": 5})
    plans = [None] * len(candidates)
    settings = _settings()

    lazy_scorer, full_scorer = _TableScorer(losses), _TableScorer(losses)
    lazy = forward_screen(
        lazy_scorer, candidates, plans, settings, ranking, stale, 1, tqdm(total=0, disable=True)
    )
    full = forward_screen(
        full_scorer, candidates, plans, settings, ranking, None, 1, tqdm(total=0, disable=True)
    )
    assert lazy.finalists == full.finalists
    assert len(full_scorer.scored) == len(candidates)
    # the changed layer's candidates were screened now whatever their old keys
    assert all(lazy.screened_at[k] == 1 for k, c in enumerate(candidates) if c.layer == 5)
    # the ones left carry their old key and step
    for k, c in enumerate(candidates):
        if c not in lazy_scorer.scored:
            assert lazy.screened_at[k] == 0 and lazy.keys[k] == old[c] and lazy.mean_loss[k] is None


def test_the_lazy_screen_screens_more_while_an_old_key_could_still_be_a_finalist():
    candidates = _candidates(6)
    ranking = Ranking(0.0, tuple([1.0] * len(candidates)))
    old = {c: float(k) for k, c in enumerate(candidates)}  # mlp 0..5 best, then attention
    # every screened-now key rose far above the old ones, so the screen must go down the old order
    losses = {i: torch.tensor([100.0 + v] * 4) for i, v in old.items()}
    losses[candidates[-1]] = torch.tensor([0.0] * 4)  # the old worst is now the best
    record = [{**c.to_dict(), "screen_key": old[c], "screened_at": 0} for c in candidates]
    scorer = _TableScorer(losses)
    screen = forward_screen(
        scorer, candidates, [None] * 12, _settings(), ranking, StaleKeys.from_record(record, {"layer": 99}), 1,
        tqdm(total=0, disable=True),
    )  # fmt: skip
    assert len(scorer.scored) == len(candidates)  # 4, then 4, then the last 4
    assert screen.finalists[0] == 0 and len(candidates) - 1 in screen.finalists


def test_stale_keys_screen_the_changed_layer_and_new_candidates_first():
    old = [Candidate("mlp", "shrink", i, 8) for i in range(4)]
    record = [{**c.to_dict(), "screen_key": float(4 - i), "screened_at": 2} for i, c in enumerate(old)]
    stale = StaleKeys.from_record(record, {"layer": 1})
    now = [old[0], Candidate("mlp", "shrink", 1, 4), old[2], old[3], Candidate("mlp", "remove", 0)]
    first, rest = stale.split(now, 1)
    # new: the narrower layer-1 width and the block removal; changed layer 1; the lowest old key: layer 3
    assert first == [1, 3, 4] and rest == [2, 0]
    assert StaleKeys.from_record([{**record[0], "screen_key": None}], {"layer": 0}) is None


def test_a_negative_rescreen_is_refused():
    with pytest.raises(SearchConfigError, match="--rescreen"):
        SearchSettings(rescreen=-1)


def _search(prunable, settings, tokens, records, done=None):
    loss = LossSettings(ignore_index=5, batch_size=2)
    scorers = {name: CalibrationScorer(prunable, tokens, loss) for name in ("block", "width")}
    return run_search(prunable, scorers, settings, done, lambda rec, p: records.append(rec), progress=False)


def _prepared(tiny_llama, seed: int, **kw) -> tuple[PrunableModel, torch.Tensor, SearchSettings]:
    """The reordered tiny model, calibration tokens, and screened NLL search settings with ``kw``."""
    prunable = PrunableModel.prepare(tiny_llama, weight_reorder=True)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, tiny_llama.config.vocab_size, (8, 20), generator=generator)
    groups = {
        "mlp_group_size": prunable.layout.mlp_width // 8,
        "attention_group_size": prunable.heads.unit_channels,
    }
    return prunable, tokens, SearchSettings(objective="nll", screen_tokens=40, **groups, **kw)


def test_a_lazily_screened_auto_search_resumes_to_the_uninterrupted_plan(tiny_llama):
    prunable, tokens, settings = _prepared(tiny_llama, 3, distribution="auto", target_ratio=35.0, rescreen=2)
    whole: list = []
    plan = _search(prunable, settings, tokens, whole)
    assert len(whole) >= 4
    lazy_steps = [r for r in whole if r.step % 2]
    assert lazy_steps and all(any(c["screened_at"] < r.step for c in r.candidates) for r in lazy_steps), (
        "a lazy step screens only some candidates"
    )
    assert all(all(c["screened_at"] == r.step for c in r.candidates) for r in whole if r.step % 2 == 0)
    for r in whole:  # the finalists are always among the candidates screened at that step
        assert all(r.candidates[k]["screened_at"] == r.step for k in r.finalists)

    prunable.restore()
    first: list = []
    _search(prunable, SearchSettings(**{**settings.__dict__, "max_steps": 3}), tokens, first)
    prunable.restore()
    rest: list = []
    resumed = _search(prunable, settings, tokens, rest, done=first)
    assert resumed == plan
    assert [r.candidates for r in first + rest] == [r.candidates for r in whole]


def test_a_staged_search_screens_lazily_within_a_stage_and_fully_at_each_stage_start(tiny_llama):
    prunable, tokens, settings = _prepared(
        tiny_llama, 4, target_ratio=40.0, distribution=(40.0, 50.0, 10.0), rescreen=3
    )
    records: list = []
    _search(prunable, settings, tokens, records)
    screened = [r for r in records if r.finalists is not None]
    firsts = {r.stage: r.step for r in reversed(screened)}  # each stage's first screened step
    assert len(firsts) >= 2
    for r in screened:
        fresh = sum(c["screened_at"] == r.step for c in r.candidates)
        if r.step in firsts.values() or r.step % 3 == 0:
            assert fresh == len(r.candidates), r.step
        assert all(r.candidates[k]["screened_at"] == r.step for k in r.finalists)
    assert any(sum(c["screened_at"] == r.step for c in r.candidates) < len(r.candidates) for r in screened)
