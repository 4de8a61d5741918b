"""A dense and a pruned model's measured speed side by side: the ratios (JSON-ready) and a terminal table."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict

from ..tables import render_table
from .speed import SpeedResult

BASELINE = "dense"
CANDIDATE = "pruned"


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0 or not math.isfinite(num) or not math.isfinite(den):
        return None
    return num / den


def compare_speed(
    results: Mapping[str, SpeedResult], baseline: str = BASELINE, candidate: str = CANDIDATE
) -> dict:
    """JSON-ready comparison: every model's numbers and candidate/baseline ratios.

    A speedup above 1 means the candidate is faster; a memory/params/disk ratio below 1 means it
    is smaller. A ratio is None when either side lacks the number (e.g. no disk path given).
    """
    missing = [k for k in (baseline, candidate) if k not in results]
    if missing:
        raise ValueError(
            f"compare_speed needs results named {baseline!r} and {candidate!r}; missing {missing}"
        )
    base, cand = results[baseline], results[candidate]
    ratios = {
        "prefill_speedup": _ratio(cand.prefill_tokens_per_s, base.prefill_tokens_per_s),
        "decode_speedup": _ratio(cand.decode_tokens_per_s, base.decode_tokens_per_s),
        "memory_ratio": _ratio(cand.peak_memory_mb, base.peak_memory_mb),
        "params_ratio": _ratio(cand.params, base.params),
        "disk_ratio": _ratio(cand.disk_mb, base.disk_mb),
    }
    return {
        "models": {name: asdict(r) for name, r in results.items()},
        "ratios": ratios,
        "baseline": baseline,
        "candidate": candidate,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_speed_table(comparison: Mapping) -> str:
    """Plain-text table for a terminal: one row per model, then the candidate/baseline ratio row."""
    header = ("model", "params (M)", "prefill tok/s", "decode tok/s", "peak mem (MB)", "disk (MB)")
    rows = []
    models = comparison.get("models", {})
    for name, r in models.items():
        rows.append(
            (
                name,
                _fmt(r["params"] / 1e6, ".2f"),
                _fmt(r["prefill_tokens_per_s"], ".1f"),
                _fmt(r["decode_tokens_per_s"], ".1f"),
                _fmt(r["peak_memory_mb"], ".1f"),
                _fmt(r.get("disk_mb"), ".1f"),
            )
        )
    ratios = comparison.get("ratios") or {}
    if ratios:
        label = f"{comparison.get('candidate', CANDIDATE)}/{comparison.get('baseline', BASELINE)}"
        keys = ("params_ratio", "prefill_speedup", "decode_speedup", "memory_ratio", "disk_ratio")
        rows.append(
            (label, *(_fmt(ratios.get(k), ".3f") + ("x" if ratios.get(k) is not None else "") for k in keys))
        )
    lines = [render_table(header, rows)]
    if models:
        first = next(iter(models.values()))
        lines.append(
            f"(batch {first['batch_size']}, prefill {first['seqlen']} tokens, decode {first['new_tokens']} new tokens "
            f"from a {first.get('decode_prompt_len', '?')}-token prompt; memory: {first.get('memory_method', '?')})"
        )
    return "\n".join(lines)
