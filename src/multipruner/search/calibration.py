"""Calibration token sets for the search: which text, how much of it, cut into sequences.

Two ways to size a set:

* **By tokens** (the default): documents are drawn in a seeded random order, joined with blank lines,
  tokenized once and cut into sequences until the set holds its token budget (rounded down to whole
  sequences). The width set is drawn first and the block set continues from where it stopped, so the
  two sets share no document while the source has enough text. A user's own ``.txt`` works whatever
  its size: a source smaller than the budget gives what it has, with a warning.
* **By samples** (the reference's ``--num_calibration_samples_*``): N random documents per set, joined
  and cut, drawn from one ``Random(seed)`` for the width set first and then the block set, exactly as
  the reference does.

A source is a name from :mod:`multipruner.data` or a path, or several joined by ``+`` (``wikitext2+piqa``):
each then fills an equal share of every set, and the sequences are shuffled so batches mix them.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import torch

from ..data import check_local_source, load_texts, tokenize
from ..errors import listing
from ..settings import setting
from ..text_files import DOC_SEPARATOR, DataSourceError

log = logging.getLogger(__name__)

# Calibration split per named source. Fixed (not "train when online") so that a run is reproducible whether
# or not the hub is reachable: WikiText-2/PTB train splits are not in the offline data, so their validation
# split is used (disjoint from the test split that perplexity is reported on). Alpaca uses the reference's
# 10% "test" part; c4 uses the reference's first train shard (hub only); PIQA uses its unlabeled test file.
CALIBRATION_SPLITS = {
    "alpaca": "test",
    "wikitext2": "validation",
    "ptb": "validation",
    "c4": "train",
    "piqa": "test",
}
SOURCE_SEPARATOR = "+"
# Defaults chosen by measurement on held-out text (docs/quality.md §1, §6): the decision sets of a step;
# every candidate is screened on the first --screen-tokens of them and only the finalists see them whole.
DEFAULT_BLOCK_TOKENS = 4096
DEFAULT_WIDTH_TOKENS = 4096
DEFAULT_SEQLEN = 512
# Below this many tokens a set's perplexity is too noisy to rank candidates on (docs/quality.md).
SANE_MIN_TOKENS = 1024


@dataclass(frozen=True)
class SetSize:
    """How big one calibration set is: ``samples`` documents (reference mode) or ``tokens``."""

    tokens: int | None = None
    samples: int | None = None


def sample_and_tokenize(
    texts: list[str],
    tokenizer: Any,
    *,
    num_samples: int | None,
    seqlen: int,
    rng: random.Random | None = None,
    min_sequences: int = 1,
) -> torch.LongTensor:
    """Sample texts, join them with ``"\\n\\n"``, tokenize once and cut into ``[n_rows, seqlen]``.

    This is the reference calibration recipe; tokenizing the joined string once (rather than per text) keeps
    document boundaries as the model sees them in running text. ``rng`` defaults to ``Random(42)`` (the
    reference seed) so that omitting it is still deterministic; ``num_samples=None`` uses all texts in order.
    """
    if seqlen < 1:
        raise DataSourceError(f"seqlen must be at least 1, got {seqlen}")
    if not texts:
        raise DataSourceError("no texts to sample calibration data from")
    if num_samples is not None:
        if num_samples < 1 or num_samples > len(texts):
            raise DataSourceError(
                f"cannot sample {num_samples} texts: the source has {len(texts)}; "
                f"use a number between 1 and {len(texts)}"
            )
        rng = rng if rng is not None else random.Random(42)
        texts = [texts[i] for i in rng.sample(range(len(texts)), num_samples)]
    ids = tokenize(DOC_SEPARATOR.join(texts), tokenizer)
    n_rows = ids.numel() // seqlen
    if n_rows < min_sequences:
        raise DataSourceError(
            f"calibration text has {ids.numel()} tokens but {seqlen * min_sequences} are needed "
            f"({min_sequences} sequence(s) of {seqlen}); use more samples or a smaller --seqlen"
        )
    return ids[: n_rows * seqlen].reshape(n_rows, seqlen).contiguous()


class DocumentStream:
    """The documents of one source in a seeded random order, handed out as whole token sequences.

    Each call continues the order where the last one stopped (no document twice until the order runs out;
    then it starts over and ``wrapped`` records that text was reused).
    """

    def __init__(self, name: str, texts: list[str], tokenizer: Any, seed: int):
        self.name, self.texts, self.tokenizer = name, texts, tokenizer
        self.order = list(range(len(texts)))
        random.Random(seed).shuffle(self.order)
        self.position = 0
        self.wrapped = False

    def _next_document(self) -> str:
        if self.position == len(self.order):
            self.position, self.wrapped = 0, True
        self.position += 1
        return self.texts[self.order[self.position - 1]]

    def rows(self, n_rows: int, seqlen: int) -> torch.Tensor:
        """Up to ``n_rows`` sequences of ``seqlen`` tokens (fewer only if the whole source is shorter)."""
        wanted = n_rows * seqlen
        chunk: list[str] = []
        counted = 0
        while True:
            # each document's own token count (+1 for the separator) is close to what it adds when joined
            while counted < wanted and len(chunk) < len(self.texts):
                chunk.append(self._next_document())
                counted += len(self.tokenizer(chunk[-1], add_special_tokens=False)["input_ids"]) + 1
            ids = tokenize(DOC_SEPARATOR.join(chunk), self.tokenizer)
            if ids.numel() >= wanted or len(chunk) >= len(self.texts):
                break
            counted = ids.numel()  # the estimate fell short: keep drawing
        n = min(n_rows, ids.numel() // seqlen)
        return ids[: n * seqlen].reshape(n, seqlen)


def resolve_source(source: str) -> list[tuple[str, str]]:
    """``(name or path, split)`` for each part of a (possibly ``+``-joined) calibration source."""
    parts = [p.strip() for p in source.split(SOURCE_SEPARATOR)] if source else []
    if not parts or not all(parts):
        raise DataSourceError(f"calibration source {source!r} is empty or has an empty part")
    resolved = []
    for part in parts:
        key = part.lower()
        if key == "default":
            resolved.extend(resolve_source(DEFAULT_SOURCE))
            continue
        # local files: the whole file, except an alpaca_data.json, which uses the reference's test part
        resolved.append((part, CALIBRATION_SPLITS.get(key, "test")))
    return resolved


# Chosen by measurement on held-out text (docs/quality.md): encyclopaedic, news and instruction text, never
# an evaluation split.
DEFAULT_SOURCE = "wikitext2+ptb+piqa"


def check_source(source: str) -> None:
    """Refuse, before any model loads, a source whose local files cannot give text (see
    :func:`multipruner.data.check_local_source`) or a part that is neither a known name nor a file."""
    for name, split in resolve_source(source):
        check_local_source(name, split=split)


def _source_texts(name: str, split: str) -> list[str]:
    return [t for t in load_texts(name, split=split) if t]


def _shares(n_rows: int, parts: int) -> list[int]:
    return [n_rows // parts + (1 if i < n_rows % parts else 0) for i in range(parts)]


def _mix(pieces: list[torch.Tensor], seed: int) -> torch.Tensor:
    rows = torch.cat(pieces)
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))
    return rows[order].contiguous()


def _by_tokens(
    streams: list[DocumentStream], size: SetSize, seqlen: int, seed: int, label: str
) -> torch.Tensor:
    n_rows = size.tokens // seqlen
    if n_rows < 1:
        raise DataSourceError(
            f"the {label} calibration budget of {size.tokens} tokens is less than one sequence of "
            f"--seqlen {seqlen}; raise the budget to at least {seqlen} or lower --seqlen"
        )
    pieces = []
    for stream, share in zip(streams, _shares(n_rows, len(streams)), strict=True):
        if share == 0:
            continue
        rows = stream.rows(share, seqlen)
        if rows.shape[0] < share:
            log.warning(
                "calibration source %s holds only %d sequences of %d tokens; the %s set gets %d instead of %d",
                stream.name,
                rows.shape[0],
                seqlen,
                label,
                rows.shape[0],
                share,
            )
        pieces.append(rows)
    tokens = _mix(pieces, seed) if len(pieces) > 1 else pieces[0]
    if tokens.shape[0] == 0:
        raise DataSourceError(
            f"the calibration source has fewer than {seqlen} tokens: not one sequence of --seqlen {seqlen}"
        )
    return tokens


def build_calibration_sets(
    source: str,
    tokenizer: Any,
    *,
    block: SetSize,
    width: SetSize,
    seqlen: int,
    seed: int = 42,
    rank_candidates: bool = True,
) -> dict[str, torch.LongTensor]:
    """The block-stage and width-stage calibration sets, ``{"block": [n, seqlen], "width": [m, seqlen]}``.

    ``rank_candidates``: the sets will rank a search's candidates, so a set too small to rank them
    without overfitting is warned about (not for tokens drawn for another use, such as compensation).

    Reference mode (``samples``) draws row indices from one ``Random(seed)``, width set first, over all
    rows as the reference does (an empty WikiText row is drawn like any other and adds only a separator);
    token mode, described in the module docstring, uses non-empty documents only.
    """
    parts = resolve_source(source)
    sets: dict[str, torch.Tensor] = {}
    if block.samples is not None or width.samples is not None:
        if len(parts) > 1:
            raise DataSourceError(
                "--num_calibration_samples_* draws from one source; use token budgets with a mixed source"
            )
        # the reference samples row indices over the dataset as it is, empty WikiText rows included
        name, split = parts[0]
        pool = load_texts(name, split=split)
        rng = random.Random(seed)
        for label, size in (("width", width), ("block", block)):
            if size.samples is None:
                raise DataSourceError(
                    "give the number of calibration samples for both sets (block and width), or neither"
                )
            sets[label] = sample_and_tokenize(
                pool, tokenizer, num_samples=size.samples, seqlen=seqlen, rng=rng
            )
    else:
        streams = [
            DocumentStream(name, _source_texts(name, split), tokenizer, seed + index)
            for index, (name, split) in enumerate(parts)
        ]
        for label, size in (("width", width), ("block", block)):
            sets[label] = _by_tokens(streams, size, seqlen, seed, label)
        reused = [s.name for s in streams if s.wrapped]
        if reused:
            log.warning("calibration source %s is smaller than both sets: they share text", ", ".join(reused))
    ranked = sets.items() if rank_candidates else ()
    for label, tokens in ranked:
        if tokens.numel() < SANE_MIN_TOKENS:
            log.warning(
                "the %s calibration set holds only %d tokens; rankings on fewer than %d tokens overfit "
                "(see docs/quality.md): give it a larger budget",
                label,
                tokens.numel(),
                SANE_MIN_TOKENS,
            )
    return {"block": sets["block"], "width": sets["width"]}


def draw_tokens(source: str, tokenizer: Any, *, tokens: int, seqlen: int, seed: int = 42) -> torch.LongTensor:
    """One set of ``tokens`` tokens in rows of ``seqlen`` for a use other than ranking candidates
    (compensation, recovery, studies): the block set a search with this budget would draw, after its
    one-sequence width set, so the same budget and seed give the same tokens."""
    return build_calibration_sets(
        source,
        tokenizer,
        block=SetSize(tokens=tokens),
        width=SetSize(tokens=seqlen),
        seqlen=seqlen,
        seed=seed,
        rank_candidates=False,
    )["block"]


@dataclass(frozen=True)
class CalibrationSettings:
    """What the search is scored on; every field changes the result."""

    calibration_dataset: str = setting(
        "default",
        help=f"text the search is scored on: a name (alpaca, wikitext2, ptb, c4, piqa), a .txt/.json/.jsonl "
        f"path, several joined by '+', or default ({DEFAULT_SOURCE})",
        aliases=("--calibration_dataset", "--calibration"),
    )
    block_tokens: int = setting(DEFAULT_BLOCK_TOKENS, help="tokens in the block-stage calibration set")
    width_tokens: int = setting(DEFAULT_WIDTH_TOKENS, help="tokens in the width-stage calibration set")
    num_calibration_samples_block: int | None = setting(
        None,
        help="the reference's sizing: this many random documents for the block set (instead of tokens)",
        aliases=("--num_calibration_samples_block", "--block-samples"),
    )
    num_calibration_samples_width: int | None = setting(
        None,
        help="the reference's sizing: this many random documents for the width set (instead of tokens)",
        aliases=("--num_calibration_samples_width", "--width-samples"),
    )
    seqlen: int = setting(DEFAULT_SEQLEN, help="calibration sequence length (the reference: 2048)")
    seed: int = setting(42, help="seed of the document draw")
    batch_size: int = setting(2, help="calibration sequences per forward", aliases=("--batch_size",))

    def set_sizes(self) -> tuple[SetSize, SetSize]:
        """(block, width) sizes: samples when the reference's counts are given, else token budgets."""
        if self.num_calibration_samples_block is not None or self.num_calibration_samples_width is not None:
            return SetSize(samples=self.num_calibration_samples_block), SetSize(
                samples=self.num_calibration_samples_width
            )
        return SetSize(tokens=self.block_tokens), SetSize(tokens=self.width_tokens)

    def validate(self) -> None:
        """Checks that need no model or data (run before anything is loaded or written)."""
        positive = {
            "--seqlen": self.seqlen,
            "--batch-size": self.batch_size,
            "--block-tokens": self.block_tokens,
            "--width-tokens": self.width_tokens,
            "--num_calibration_samples_block": self.num_calibration_samples_block,
            "--num_calibration_samples_width": self.num_calibration_samples_width,
        }
        bad = [
            f"{flag} must be at least 1, got {value}"
            for flag, value in positive.items()
            if value is not None and value < 1
        ]
        if self.seqlen is not None and self.seqlen < 2:
            bad.append(f"--seqlen must be at least 2 (a next-token loss needs two tokens), got {self.seqlen}")
        if self.num_calibration_samples_block is None and self.num_calibration_samples_width is None:
            for flag, budget in (
                ("--block-tokens", self.block_tokens),
                ("--width-tokens", self.width_tokens),
            ):
                if budget >= 1 and budget < self.seqlen:
                    bad.append(
                        f"{flag} {budget} is less than one sequence of --seqlen {self.seqlen}; "
                        f"give at least {self.seqlen} tokens or lower --seqlen"
                    )
        if bad:
            raise DataSourceError(listing("invalid calibration settings", bad))

    def check_source(self) -> None:
        """The calibration text is there and readable (before the model loads; see :func:`check_source`)."""
        check_source(self.calibration_dataset)

    def build(self, tokenizer: Any) -> dict[str, torch.LongTensor]:
        block, width = self.set_sizes()
        return build_calibration_sets(
            self.calibration_dataset, tokenizer, block=block, width=width, seqlen=self.seqlen, seed=self.seed
        )
