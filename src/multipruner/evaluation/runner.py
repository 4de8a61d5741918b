"""`multipruner eval`: perplexity texts and zero-shot tasks of one model, as an :class:`EvalResult`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ..data import check_local_source, eval_token_stream
from ..errors import UsageError
from ..search.objective import ignored_label
from ..settings import setting
from .perplexity import stream_perplexity
from .results import PPL, EvalMeta, EvalResult, Metric

log = logging.getLogger(__name__)

PPL_SOURCES = ("wikitext2", "ptb", "c4", "hellaswag-text")
DEFAULT_TASKS = ["wikitext2", "piqa", "arc_easy", "boolq", "hellaswag"]


@dataclass(frozen=True)
class EvalSettings:
    """What to measure; none of it changes the pruned model."""

    tasks: list[str] = setting(
        help="comma list: perplexity texts (wikitext2, ptb, c4, hellaswag-text: HellaSwag's contexts with their "
        "gold endings, a domain no calibration source holds; a .txt path) and zero-shot tasks (piqa, "
        "winogrande, hellaswag, arc_easy, arc_challenge, boolq, openbookqa)",
        default_factory=lambda: list(DEFAULT_TASKS),
        affects_result=False,
    )
    limit: int | None = setting(200, help="examples per zero-shot task (0: all)", affects_result=False)
    seqlen: int = setting(2048, help="perplexity window (the papers: 2048)", affects_result=False)
    max_windows: int | None = setting(
        None,
        help="score only the first N perplexity windows of each text (default: all)",
        affects_result=False,
    )
    batch_size: int = setting(8, help="zero-shot batch size", affects_result=False)

    def validate(self) -> None:
        problems = []
        if not self.tasks:
            problems.append("no evaluation task given (e.g. --tasks wikitext2,piqa)")
        if self.limit is not None and self.limit < 0:
            problems.append(f"the example limit must be 0 (all) or more, got {self.limit}")
        if self.seqlen < 2:
            problems.append(f"--seqlen (the perplexity window) must be at least 2 tokens, got {self.seqlen}")
        if self.max_windows is not None and self.max_windows < 1:
            problems.append(f"--max-windows must be at least 1, got {self.max_windows}")
        if self.batch_size < 1:
            problems.append(f"the batch size must be at least 1, got {self.batch_size}")
        if problems:
            raise UsageError("invalid evaluation settings: " + "; ".join(problems))

    def check_tasks(self, overrides: dict[str, str] | None = None) -> None:
        """Every task is a perplexity text or a zero-shot task whose data is found (a ``.txt`` text: read
        and non-empty): checked before the model loads, which takes far longer than these checks."""
        from .zeroshot import SUPPORTED_TASKS, resolve_task_files

        zero_shot = [t for t in self.tasks if not is_perplexity_source(t)]
        unknown = [t for t in zero_shot if t not in SUPPORTED_TASKS]
        if unknown:
            raise UsageError(
                f"unknown task(s) {', '.join(unknown)}: --tasks takes perplexity texts ({', '.join(PPL_SOURCES)} "
                f"or a .txt path) and zero-shot tasks ({', '.join(SUPPORTED_TASKS)})"
            )
        for text in self.tasks:
            if text.endswith(".txt"):
                check_local_source(text)
        if zero_shot:
            resolve_task_files(zero_shot, overrides=overrides)


def is_perplexity_source(task: str) -> bool:
    return task in PPL_SOURCES or task.endswith(".txt")


def evaluate(
    model,
    tokenizer,
    settings: EvalSettings,
    *,
    name: str = "",
    dense_params: int | None = None,
    progress: bool = True,
    overrides=None,
) -> EvalResult:
    """Evaluate ``model`` on ``settings.tasks``; ``dense_params`` marks it as pruned from a model that size."""
    started = time.perf_counter()
    params = sum(p.numel() for p in model.parameters())
    limit = settings.limit or None
    tasks: dict[str, dict[str, Metric]] = {}
    texts = [t for t in settings.tasks if is_perplexity_source(t)]
    zero_shot = [t for t in settings.tasks if not is_perplexity_source(t)]
    for source in texts:
        stream = eval_token_stream(source, tokenizer)
        if settings.max_windows:
            stream = stream[: settings.max_windows * settings.seqlen]
        windows = stream.numel() // settings.seqlen
        ppl = stream_perplexity(
            model, stream, seqlen=settings.seqlen, ignore_index=ignored_label(tokenizer), progress=progress
        )
        label = source if source in PPL_SOURCES else Path(source).stem
        tasks[label] = {PPL: Metric(ppl, None, windows)}
        log.info("%s perplexity (seqlen %d, %d windows): %.3f", label, settings.seqlen, windows, ppl)
    if zero_shot:
        from .zeroshot import evaluate_zero_shot

        tasks.update(
            evaluate_zero_shot(
                model,
                tokenizer,
                zero_shot,
                limit=limit,
                batch_size=settings.batch_size,
                overrides=overrides,
                device=None,
            )
        )
    parameter = next(model.parameters())
    meta = EvalMeta(
        model=name,
        params=params,
        dense_params=dense_params if dense_params and dense_params != params else None,
        limit=limit,
        seqlen=settings.seqlen,
        dtype=str(parameter.dtype).removeprefix("torch."),
        device=str(parameter.device),
        wall_s=time.perf_counter() - started,
    )
    return EvalResult(meta, tasks)
