"""`multipruner eval`: perplexity and zero-shot accuracy of one model, in the reference's result shape."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

from ..data import eval_token_stream
from ..io_utils import atomic_write_text
from .perplexity import stream_perplexity

log = logging.getLogger(__name__)

PPL_SOURCES = ("wikitext2", "ptb", "c4")


def evaluate(
    model,
    tokenizer,
    tasks: list[str],
    *,
    limit: int | None = None,
    seqlen: int = 2048,
    batch_size: int = 8,
    dense_params: int | None = None,
    progress: bool = True,
    overrides=None,
) -> dict:
    """Evaluate ``tasks``: perplexity sources (wikitext2, ptb, c4, or a .txt path) and lm-eval task names."""
    params = sum(p.numel() for p in model.parameters())
    result: dict = {
        "total_params": dense_params or params,
        "pruned_model_params": params,
        "ratio": 100.0 * (1 - params / (dense_params or params)),
    }
    ppl_tasks = [t for t in tasks if t in PPL_SOURCES or t.endswith(".txt")]
    zero_shot = [t for t in tasks if t not in ppl_tasks]
    for source in ppl_tasks:
        stream = eval_token_stream(source, tokenizer)
        name = source if source in PPL_SOURCES else Path(source).stem
        result[f"ppl_{name}"] = stream_perplexity(
            model, stream, seqlen=seqlen, ignore_index=tokenizer.eos_token_id, progress=progress
        )
        log.info("%s perplexity (seqlen %d): %.3f", name, seqlen, result[f"ppl_{name}"])
    if zero_shot:
        from .zeroshot import evaluate_zero_shot, headline_metric

        scores = evaluate_zero_shot(
            model, tokenizer, zero_shot, limit=limit, batch_size=batch_size, overrides=overrides, device=None
        )
        for task, metrics in scores["tasks"].items():
            result[task] = round(100 * metrics[headline_metric(metrics)], 2)
        result["5cs_acc_avg"] = None if scores["paper_avg"] is None else round(100 * scores["paper_avg"], 2)
        result["details"] = scores
    result["limit"] = limit
    result["seqlen"] = seqlen
    return result


def write_results(result: dict, path: str | Path) -> None:
    """JSON, plus a CSV beside it with the reference's columns."""
    path = Path(path)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    columns = ["total_params", "pruned_model_params", "ratio"]
    columns += [k for k in result if k.startswith("ppl_")]
    columns += [
        k
        for k in result
        if k not in columns and isinstance(result[k], (int, float)) and k not in ("limit", "seqlen")
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerow(result)
    atomic_write_text(path.with_suffix(".csv"), buffer.getvalue())
