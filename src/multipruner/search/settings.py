"""The search's settings: method, ratio and its split, group sizes, channel order, racing; each checked
when built (what needs no model) and against a model's layout (``resolved``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..core.importance import CHANNEL_IMPORTANCE
from ..core.layout import ModelLayout
from ..errors import UsageError, listing
from ..settings import setting
from .cost import Budget, BudgetError, Cost
from .latency import LATENCY_MEASURES, LatencyTable
from .objective import OBJECTIVES, set_objective
from .racing import RACE_MODES, RaceSettings
from .screening import SCREENS, FinalistRule

RATIO_ACCOUNTING = ("exact", "reference")


class SearchConfigError(UsageError):
    """Search settings that cannot work for this model."""


def distribution_problem(values: tuple, given: object = None) -> str | None:
    """The one check of a distribution (flag text and settings alike): three non-negative shares with a
    positive sum. ``given``: what to show, when not ``values`` (the flag's text)."""
    if len(values) == 3 and not any(v < 0 for v in values) and not sum(values) <= 0:
        return None
    return (
        "pruning distribution must be three non-negative numbers a:b:c with a positive sum "
        f"(e.g. 44:52:4), got {values if given is None else given!r}"
    )


# every step weighs the candidates of all three dimensions together (stages.AUTO)
AUTO = "auto"


def parse_distribution(text: str) -> tuple[float, float, float] | str:
    """``a:b:c`` shares of the ratio for blocks, MLP channels and attention heads (e.g. ``44:52:4``), or
    ``auto``."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        values = tuple(float(p) for p in text.split(":"))
    except ValueError:
        values = ()
    if problem := distribution_problem(values, text):
        raise ValueError(problem)
    return values


def parse_budget(text: str) -> str:
    """A ``--budget`` checked as it is read, kept as the text the user gave (the run stores that)."""
    Budget.parse(text)
    return text


METHODS = ("multipruner", "blockpruner", "shortgpt")
# measured (docs/quality.md §6): a block step's best K on 1,024 tokens holds the held-out best
DEFAULT_SCREEN_TOKENS = 1024
# measured (docs/quality.md §7): over SmolLM2's auto search every step's finalists were in the last
# step's best 10, and re-screening the best 16 made the full screen's 31 choices
DEFAULT_AUTO_RESCREEN = 16
DEFAULT_DISTRIBUTION = {"multipruner": (44.0, 52.0, 4.0), "blockpruner": (100.0, 0.0, 0.0)}


@dataclass(frozen=True)
class SearchSettings:
    method: str = setting(
        "multipruner",
        help="multipruner: blocks, then MLP channels, then attention heads (the paper); blockpruner: "
        "attention/MLP blocks only (distribution 100:0:0); shortgpt: whole layers with the lowest Block "
        "Influence, in one shot",
        choices=METHODS,
    )
    target_ratio: float = setting(
        10.0, help="target pruning ratio, percent of all parameters", aliases=("--target_ratio",)
    )
    distribution: tuple[float, float, float] | str | None = setting(
        None,
        help="share of the ratio for blocks:MLP channels:attention heads, removed in that order "
        "(default: 44:52:4 for multipruner, 100:0:0 for blockpruner; shortgpt takes none); auto: every "
        "step weighs blocks, MLP channel groups and attention groups together and removes the one with "
        "the least loss increase per unit of the budget's measure saved (not in the paper)",
        aliases=("--pruning_distribution",),
        parse=parse_distribution,
    )
    budget: str | None = setting(
        None,
        help="what to reach instead of --target-ratio's share of the parameters: MEASURE=VALUE, with a "
        "measure of params, weights (bytes), flops (per decoded token), kv (KV-cache bytes), decode or "
        "prefill (seconds on this device, timed before the search), and a value to remove (20%), a "
        "factor (1.25x: a fourth less, or 1.25 times as fast) or the amount to end at (400MB, 30ms); "
        "e.g. weights=400MB, kv=50%, decode=1.25x",
        parse=parse_budget,
    )
    cost_context: int = setting(
        512,
        help="tokens of context the flops, kv and decode measures count a decoded token at (prefill: the "
        "sequence length)",
    )
    latency_batch_size: int = setting(1, help="sequences per run the decode and prefill measures time")
    mlp_group_size: int | None = setting(
        None,
        help="MLP channels removed per width step (default: the divisor of the MLP width nearest width/12)",
        aliases=("--mlp_channel_group_size",),
    )
    attention_group_size: int | None = setting(
        None,
        help="query channels removed per attention step, whole KV groups (default: one KV group)",
        aliases=("--attn_channel_group_size", "--attn-group-size"),
    )
    weight_reorder: bool = setting(
        True, help="reorder channels by importance before the search", aliases=("--weight_reorder",)
    )
    channel_importance: str = setting(
        "activations",
        help="what orders the channels a width step drops: activations, each channel's contribution to "
        "its branch output on the calibration sets (not in the paper; the plan stores the permutation; "
        "held-out WikiText-2 perplexity 15 percent lower on SmolLM2 at 10 percent, docs/quality.md); "
        "l1, the weights' L1 norms (the paper's)",
        choices=tuple(CHANNEL_IMPORTANCE),
        until_recorded="l1",  # runs made before the setting ordered by L1: they resume that way
    )
    ratio_accounting: str = setting(
        "exact",
        help="exact: a removed block's norms leave with it (the saved model's real size); reference: they "
        "stay counted, as in the authors' code (reproduces where its stages stop)",
        choices=RATIO_ACCOUNTING,
    )
    whole_layers: bool = setting(
        False,
        help="the block stage also offers each whole layer (its attention and MLP blocks together) as one "
        "step, the move ShortGPT makes and single-block steps cannot reach (not in the paper)",
    )
    search: str = setting(
        "exact",
        help="exact: drop candidates that provably cannot win (same plan as scoring all); "
        "fast: also drop those a paired test shows worse; off: score every candidate on every batch",
        choices=RACE_MODES,
    )
    objective: str = setting(
        "kl-block",
        help="what a step minimises: nll, the calibration perplexity (the paper's); kl, the mean KL divergence "
        "from the dense model's next-token distribution (its top --kl-top-k tokens and the rest as one "
        "bucket; not in the paper); kl-block: kl on block steps, nll on width steps, where each ranks "
        "with less held-out regret (docs/quality.md §6)",
        choices=OBJECTIVES,
        until_recorded="nll",  # runs made before the setting scored by NLL: they resume that way
    )
    kl_top_k: int = setting(
        64,
        help="--objective kl: the dense model's most likely tokens kept per position (the rest: one bucket)",
    )
    screen_tokens: int | None = setting(
        None,
        help="screen, then decide: every candidate is scored on this many tokens (the first sequences of its "
        f"stage's calibration set), and only the --finalists on the whole set, where the step chooses "
        f"(default: {DEFAULT_SCREEN_TOKENS} where the stage's set is larger; 0: every candidate on the whole set)",
        until_recorded=0,
    )
    # forward: over a whole SmolLM2 width stage the proxy's top 3 held the step's choice in 5 of 33 steps
    # (benchmarks/proxy_recall.py, docs/quality.md §6), and its cuts piled up in layers 12-19
    width_screen: str = setting(
        "forward",
        help="how width steps screen: forward (scored on --screen-tokens) or proxy (ranked by the share of "
        "the branch output the dropped channels carry, measured in one forward on the --screen-tokens, or "
        "on the whole width set without them; no forward per candidate, but a poor ranking: docs/quality.md §6)",
        choices=SCREENS,
    )
    finalists: int = setting(3, help="screened candidates scored on the whole calibration set: the best K")
    rescreen: int | None = setting(
        None,
        help="lazy screening (not in the paper): a screened step re-screens only the N candidates whose last "
        "screen ranked best, those at the layer the last step changed, and the next N while one of them "
        "could still be a finalist; the others keep their last screen's key, and every N-th step screens "
        f"all (default: {DEFAULT_AUTO_RESCREEN} with --distribution auto, where it chose the full screen's "
        "plan in a third of the time, docs/quality.md §7; 0 otherwise: every candidate every step)",
        until_recorded=0,
    )
    finalist_margin: float = setting(
        0.0,
        help="also every screened candidate within this many nats per sequence of the screening leader",
    )
    layer_major_mb: float = setting(
        0.0,
        help="layer-major scoring: candidates past their own layer go through each later layer in one call, "
        "up to this many MB of activations (0: one candidate at a time; the same scores either way; "
        "slower on CPU, meant for GPUs)",
        affects_result=False,
    )
    reuse_mb: float = setting(
        2048.0,
        help="memory for the hidden states the search keeps to skip work (a candidate's from the last step, "
        "each batch's layer inputs, final states until a head bound settles), each within this many MB; "
        "lower it if the search runs out of memory (0: keep none; slower, the same plan)",
        affects_result=False,
    )
    max_steps: int | None = setting(
        None,
        help="stop after this many search steps (resume later)",
        affects_result=False,
        aliases=("--max_steps",),
    )

    def __post_init__(self):
        if self.distribution is None and self.method in DEFAULT_DISTRIBUTION:
            object.__setattr__(self, "distribution", DEFAULT_DISTRIBUTION[self.method])
        elif self.distribution is not None and self.distribution != AUTO:
            object.__setattr__(self, "distribution", tuple(float(d) for d in self.distribution))
        # settings that cannot work are refused when built; the checks that need the model: validate()
        if problems := self._problems_without_model():
            raise SearchConfigError(listing("invalid search settings", problems))

    @property
    def orders_by_activations(self) -> bool:
        """Channels are ordered by data, so the order waits for the calibration sets."""
        return self.weight_reorder and CHANNEL_IMPORTANCE[self.channel_importance].needs_calibration

    @property
    def race(self) -> RaceSettings:
        return RaceSettings(mode=self.search)

    def objective_for(self, calibration: str) -> str:
        """The loss (nll or kl) of the steps scored on calibration set ``calibration``."""
        return set_objective(self.objective, calibration)

    @property
    def finalist_rule(self) -> FinalistRule:
        return FinalistRule(self.finalists, self.finalist_margin)

    @property
    def rescreen_size(self) -> int:
        """Candidates a lazily screened step re-screens first (0: every candidate, every step)."""
        if self.rescreen is None:
            return DEFAULT_AUTO_RESCREEN if self.auto else 0
        return self.rescreen

    def screen_rows(self, calibration: str, n_rows: int, seqlen: int) -> int:
        """How many of a calibration set's first rows screen its stage's candidates (0: none, every
        candidate is scored on the whole set; for a proxy screen, the rows it is measured on, 0: all)."""
        if self.screen_tokens is None:  # the default: a screen where the set is larger than one
            rows = max(1, DEFAULT_SCREEN_TOKENS // seqlen)
            return rows if rows < n_rows else 0
        if problem := self.screen_problem({calibration: n_rows * seqlen}):
            raise SearchConfigError(problem)
        if 0 < self.screen_tokens < seqlen:
            raise SearchConfigError(
                f"--screen-tokens {self.screen_tokens} is less than one calibration sequence of {seqlen} "
                f"tokens: give at least {seqlen}, or 0"
            )
        return min(self.screen_tokens // seqlen, n_rows)

    def screen_problem(self, decision_tokens: dict[str, int]) -> str | None:
        """A --screen-tokens given that leaves a forward-screened stage no larger set to decide on
        (``decision_tokens``: ``{"block": tokens, "width": tokens}``)."""
        screen = self.screen_tokens
        forward = [n for n in decision_tokens if n == "block" or self.width_screen == "forward"]
        too_big = {n: decision_tokens[n] for n in forward if screen and screen >= decision_tokens[n]}
        if not too_big:
            return None
        sets = ", ".join(f"the {name} set's {tokens}" for name, tokens in too_big.items())
        return (
            f"--screen-tokens {screen} leaves no larger set to decide on ({sets} tokens): give the stage a "
            "bigger calibration set (--block-tokens/--width-tokens), fewer --screen-tokens, or 0"
        )

    def resolved(self, layout: ModelLayout, dtype_bytes: int = 4) -> SearchSettings:
        """These settings with the model-dependent defaults filled in, checked against ``layout`` (and the
        budget against what the model, at weights of ``dtype_bytes``, can give)."""
        settings = replace(
            self,
            mlp_group_size=self.mlp_group_size or default_mlp_group_size(layout.mlp_width),
            attention_group_size=self.attention_group_size or layout.heads.unit_channels,
        )
        settings.validate(layout)
        if settings.latency_workload is None:  # a latency budget is checked once its table is timed
            settings.reachable_target(layout, dtype_bytes)
        return settings

    @property
    def auto(self) -> bool:
        return self.distribution == AUTO

    @property
    def target(self) -> Budget:
        """The budget to reach: --budget, else --target-ratio percent of the parameters."""
        return Budget.parse(self.budget) if self.budget else Budget("params", self.target_ratio, "percent")

    @property
    def latency_workload(self) -> tuple[str, int, int] | None:
        """What a latency budget times: (decode or prefill, batch size, context); None for other budgets."""
        workload = LATENCY_MEASURES.get(self.target.measure)
        return None if workload is None else (workload, self.latency_batch_size, self.cost_context)

    def cost(self, layout: ModelLayout, dtype_bytes: int, latency: LatencyTable | None = None) -> Cost:
        """What the budget measures, for this model at its weights' dtype (and, for a latency, with the
        table timed on this device)."""
        return Cost(
            layout, self.target.measure, self.ratio_accounting, dtype_bytes, self.cost_context, latency
        )

    def stage_targets(self, target: float) -> tuple[float, ...]:
        """Each stage's cumulative share of ``target`` (percent of the budget's measure to remove)."""
        if self.auto:
            return (target,)
        total = sum(self.distribution)
        a, b, _ = (d / total for d in self.distribution)
        return (target * a, target * (a + b), target)

    def reachable_target(
        self, layout: ModelLayout, dtype_bytes: int, latency: LatencyTable | None = None
    ) -> float:
        """The percent of the budget's measure to remove, refused here, before any search, when no plan
        the search can reach removes that much (the message gives the most that can be)."""
        cost = self.cost(layout, dtype_bytes, latency)
        wanted = self.target.reduction(cost)
        smallest = cost.smallest_plan(self.mlp_group_size, self.attention_group_size)
        most = cost.reduction(smallest)
        if wanted > most:
            budget = self.budget or f"--target-ratio {self.target_ratio:g}"
            raise SearchConfigError(
                f"budget {budget} cannot be reached: the most this model can lose of its {cost.measure} is "
                f"{most:.2f} % ({self.target.written(cost, most)}: {cost.format(cost.of(smallest))} of "
                f"{cost.format(cost.dense())}, one attention block at one group); ask for at most that"
            )
        if wanted <= 0:
            raise SearchConfigError(
                f"budget {self.budget}: the model already costs {cost.format(cost.dense())}, within it; "
                "nothing to remove"
            )
        staged = self.distribution is not None and not self.auto  # shortgpt has no split
        if staged and cost.measure == "kv-bytes" and self.distribution[1] > 0:
            raise SearchConfigError(
                f"a kv budget cannot be split {':'.join(f'{d:g}' for d in self.distribution)}: MLP channels "
                "hold no KV cache, so the MLP stage could never reach its share; give a:0:c, or "
                "--distribution auto"
            )
        return wanted

    def _problems_without_model(self) -> list[str]:
        """Ratio, method, distribution, step limit, group sizes given (run when the settings are built)."""
        problems = []
        if not 0 < self.target_ratio < 100:
            problems.append(f"target ratio must be in (0, 100) percent, got {self.target_ratio}")
        if self.reuse_mb < 0:
            problems.append(f"--reuse-mb must be 0 (keep nothing) or a positive budget, got {self.reuse_mb}")
        if self.layer_major_mb < 0:
            problems.append(
                f"--layer-major-mb must be 0 (off) or a positive budget, got {self.layer_major_mb}"
            )
        if self.objective not in OBJECTIVES:
            problems.append(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.channel_importance not in CHANNEL_IMPORTANCE:
            problems.append(
                f"unknown channel importance {self.channel_importance!r}; choose one of "
                f"{', '.join(CHANNEL_IMPORTANCE)}"
            )
        if self.width_screen not in SCREENS:
            problems.append(f"unknown width screen {self.width_screen!r}; choose one of {', '.join(SCREENS)}")
        if (self.rescreen or 0) < 0:
            problems.append(f"--rescreen must be 0 (screen every candidate) or more, got {self.rescreen}")
        if self.finalists < 1:
            problems.append(
                f"--finalists must be at least 1 (the screen's best goes on), got {self.finalists}"
            )
        if self.finalist_margin < 0 or (self.screen_tokens or 0) < 0 or self.kl_top_k < 1:
            problems.append(
                "--finalist-margin and --screen-tokens must be 0 or more and --kl-top-k at least 1, got "
                f"{self.finalist_margin}, {self.screen_tokens} and {self.kl_top_k}"
            )
        if self.method not in METHODS:
            problems.append(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
            return problems
        if self.budget:
            try:
                Budget.parse(self.budget)
            except BudgetError as err:
                problems.append(str(err))
        if self.cost_context < 1 or self.latency_batch_size < 1:
            problems.append(
                f"--cost-context and --latency-batch-size must be at least 1, got {self.cost_context} and "
                f"{self.latency_batch_size}"
            )
        if self.method == "shortgpt":
            if self.distribution is not None:
                problems.append("--method shortgpt removes whole layers in one shot: drop --distribution")
            return problems
        if self.auto:
            if self.method != "multipruner":
                problems.append(
                    "--distribution auto weighs all three dimensions: it needs --method multipruner"
                )
            if self.search == "fast" or self.finalist_margin > 0:
                problems.append(
                    "--distribution auto compares loss per unit of cost; --search fast and --finalist-margin "
                    "compare losses in nats: use --search exact and the top --finalists"
                )
            return problems
        if self.method == "blockpruner" and self.distribution[1:] != (0.0, 0.0):
            problems.append(
                f"--method blockpruner removes blocks only (distribution 100:0:0), not "
                f"{':'.join(f'{d:g}' for d in self.distribution)}: drop --distribution, or use --method multipruner"
            )
        if problem := distribution_problem(self.distribution):
            problems.append(problem)
        for flag, size in (
            ("--mlp-group-size", self.mlp_group_size),
            ("--attention-group-size", self.attention_group_size),
        ):
            if size is not None and size <= 0:
                problems.append(f"{flag} must be positive, got {size}")
        if self.max_steps is not None and self.max_steps < 0:
            problems.append(f"--max-steps must be 0 or more, got {self.max_steps}")
        return problems

    def validate(self, layout: ModelLayout) -> None:
        """The checks against the model (those without it ran when the settings were built)."""
        problems = []
        # A group need not divide the width (the reference's published commands use such sizes): a width
        # shrinks by the group while something remains, e.g. 18944 by 1024 down to 512.
        for flag, g, full in (
            ("--mlp-group-size", self.mlp_group_size, layout.mlp_width),
            ("--attention-group-size", self.attention_group_size, layout.attention_width),
        ):
            if g is not None and g >= full:
                problems.append(f"{flag} {g} leaves nothing of the width {full}: choose a smaller group")
        if problem := layout.heads.attention_group_problem(self.attention_group_size):
            problems.append(problem)
        if problems:
            raise SearchConfigError(listing("invalid search settings", problems))


def default_mlp_group_size(width: int) -> int:
    """The divisor of ``width`` nearest to width/12 (the authors use ~1/11-1/14 of the MLP width)."""
    divisors = [d for d in range(1, width + 1) if width % d == 0]
    return min(divisors, key=lambda d: (abs(d - width / 12), -d))
