"""Real speed and memory of a model, measured so a dense and a pruned model can be compared fairly.

Parameter counts say what pruning should save; this module measures what it does save on the
hardware at hand. What is measured, per model:

* **prefill tokens/s** -- ``batch * seqlen`` divided by the median wall time of one forward pass
  over random token ids (``use_cache=False``, ``torch.inference_mode``). This is the cost of reading
  a prompt.
* **decode tokens/s** -- tokens generated divided by the median wall time of one greedy
  ``model.generate`` call of ``new_tokens`` tokens from a short prompt (the first
  ``min(seqlen, 128)`` ids). The time includes the prefill of that short prompt, so the number is
  slightly pessimistic for long generations; it is what a user of ``generate`` sees.
* **peak memory** -- on CUDA, the model's own weight and buffer bytes plus the peak of
  ``torch.cuda.max_memory_allocated`` above what was allocated just before each run (so another
  model resident on the same GPU does not count). On CPU the process RSS high-water mark cannot
  tell two models apart, so it is the weight and buffer bytes plus the bytes of the KV cache that
  ``generate`` returns after decoding (activations are not counted). ``memory_method`` says which.
* **disk size** -- the files of a saved model directory, when its path is given.

Noise (other processes, frequency scaling, thermal state) shifts timings by tens of percent on a
shared machine. ``measure_side_by_side`` therefore alternates the models repeat by repeat
(A B A B ...) so drift hits every model alike, and reports medians. Thread settings are left as
they are: the caller decides how many threads a benchmark may use.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ..settings import setting
from ..timing import timed
from .model_size import MB, cache_bytes, count_params, directory_size_mb, weight_bytes

logger = logging.getLogger(__name__)

DECODE_PROMPT_MAX = 128


@dataclass(frozen=True)
class BenchSettings:
    """The workload both models are timed on."""

    batch_size: int = setting(1, help="sequences per forward")
    seqlen: int = setting(512, help="prefill length in tokens")
    new_tokens: int = setting(64, help="tokens generated with the KV cache")
    repeats: int = setting(3, help="timed runs per model (the median is reported)")

    def validate(self) -> None:
        bad = [
            f"--{k.replace('_', '-')} must be at least 1, got {v}" for k, v in asdict(self).items() if v < 1
        ]
        if bad:
            raise UsageError("; ".join(bad))


@dataclass(frozen=True)
class SpeedResult:
    """Measured speed and memory of one model under one workload (see the module docstring)."""

    params: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_memory_mb: float
    disk_mb: float | None
    batch_size: int
    seqlen: int
    new_tokens: int
    weights_mb: float = 0.0  # parameter + buffer bytes
    kv_cache_mb: float = 0.0  # KV cache after decoding (part of peak_memory_mb on CPU)
    decode_prompt_len: int = 0  # prompt length of the decode measurement
    memory_method: str = ""  # "cuda_max_allocated" or "weights+kv_cache"
    device: str = "cpu"


@dataclass
class _Bench:
    """Per-model state while the repeats of several models are interleaved."""

    model: nn.Module
    device: torch.device
    prefill_times: list[float]
    decode_times: list[float]
    generated_tokens: int = 0
    kv_cache_bytes: int = 0
    cuda_peak_extra_bytes: int = 0


# --------------------------------------------------------------------------- helpers
def _model_device(model: nn.Module) -> torch.device:
    """Where the input ids must live: the device of the input embedding (first parameter as fallback)."""
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


def _vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if size is None:
        size = model.get_input_embeddings().num_embeddings
    return int(size)


def _warn_if_too_long(models: Mapping[str, nn.Module], length: int) -> None:
    """Beyond the trained context a model still runs but is not representative of real use."""
    for name, model in models.items():
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(limit, int) and length > limit:
            logger.warning("%s: benchmark length %d exceeds max_position_embeddings %d", name, length, limit)


def _pad_token_id(model: nn.Module) -> int:
    """A pad id for ``generate``, so it neither warns nor guesses (our batches are never padded)."""
    for config in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(config, attr, None)
            if isinstance(value, list | tuple):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return 0


# --------------------------------------------------------------------------- one run
def _prefill(bench: _Bench, ids: torch.Tensor) -> float:
    seconds, _ = timed(lambda: bench.model(input_ids=ids, use_cache=False), bench.device)
    return seconds


def _decode(bench: _Bench, prompt: torch.Tensor, new_tokens: int) -> float:
    mask = torch.ones_like(prompt)

    def run() -> Any:
        return bench.model.generate(
            prompt,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            return_dict_in_generate=True,
            pad_token_id=_pad_token_id(bench.model),
        )

    seconds, out = timed(run, bench.device)
    bench.generated_tokens = int(out.sequences.shape[0] * (out.sequences.shape[1] - prompt.shape[1]))
    # ``cache`` since transformers 5.24, ``past_key_values`` before
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    bench.kv_cache_bytes = cache_bytes(cache)
    return seconds


def _run_once(bench: _Bench, what: Callable[[], float]) -> float:
    """One timed run; on CUDA also the peak allocation above what was allocated when it started."""
    if bench.device.type != "cuda":
        return what()
    torch.cuda.reset_peak_memory_stats(bench.device)
    before = torch.cuda.memory_allocated(bench.device)
    seconds = what()
    extra = torch.cuda.max_memory_allocated(bench.device) - before
    bench.cuda_peak_extra_bytes = max(bench.cuda_peak_extra_bytes, extra)
    return seconds


def _result(
    bench: _Bench, batch_size: int, seqlen: int, new_tokens: int, prompt_len: int, disk_mb: float | None
) -> SpeedResult:
    weights = weight_bytes(bench.model)
    if bench.device.type == "cuda":
        peak, method = weights + bench.cuda_peak_extra_bytes, "cuda_max_allocated"
    else:
        peak, method = weights + bench.kv_cache_bytes, "weights+kv_cache"
    return SpeedResult(
        params=count_params(bench.model),
        prefill_tokens_per_s=batch_size * seqlen / statistics.median(bench.prefill_times),
        decode_tokens_per_s=bench.generated_tokens / statistics.median(bench.decode_times),
        peak_memory_mb=peak / MB,
        disk_mb=disk_mb,
        batch_size=batch_size,
        seqlen=seqlen,
        new_tokens=new_tokens,
        weights_mb=weights / MB,
        kv_cache_mb=bench.kv_cache_bytes / MB,
        decode_prompt_len=prompt_len,
        memory_method=method,
        device=str(bench.device),
    )


# --------------------------------------------------------------------------- public API
def measure_side_by_side(
    models: Mapping[str, nn.Module],
    *,
    batch_size: int = 1,
    seqlen: int = 512,
    new_tokens: int = 64,
    repeats: int = 3,
    warmup: int = 1,
    vocab_size: int | None = None,
    seed: int = 0,
    disk_paths: Mapping[str, str | Path] | None = None,
) -> dict[str, SpeedResult]:
    """Measure several models on the same random ids, alternating them repeat by repeat.

    All models see identical input ids (drawn from the smallest vocabulary among them unless
    ``vocab_size`` is given). Warm-up runs are untimed. ``disk_paths`` maps a model name to its
    saved directory for ``disk_mb``.
    """
    if not models:
        raise ValueError("measure_side_by_side needs at least one model")
    if min(batch_size, seqlen, new_tokens, repeats) < 1 or warmup < 0:
        raise ValueError(
            f"batch_size, seqlen, new_tokens and repeats must be >= 1 and warmup >= 0 "
            f"(got {batch_size}, {seqlen}, {new_tokens}, {repeats}, {warmup})"
        )
    vocab = vocab_size or min(_vocab_size(m) for m in models.values())
    generator = torch.Generator().manual_seed(seed)
    ids_cpu = torch.randint(0, vocab, (batch_size, seqlen), generator=generator)
    prompt_len = min(seqlen, DECODE_PROMPT_MAX)
    _warn_if_too_long(models, max(seqlen, prompt_len + new_tokens))
    benches = {name: _Bench(m, _model_device(m), [], []) for name, m in models.items()}
    inputs = {name: ids_cpu.to(b.device) for name, b in benches.items()}

    with torch.inference_mode(), _all_eval(models):
        for _ in range(warmup):
            for name, bench in benches.items():
                _prefill(bench, inputs[name])
                _decode(bench, inputs[name][:, :prompt_len], new_tokens)
        for r in range(repeats):
            for name, bench in benches.items():
                ids = inputs[name]
                bench.prefill_times.append(_run_once(bench, lambda b=bench, i=ids: _prefill(b, i)))
                bench.decode_times.append(
                    _run_once(bench, lambda b=bench, i=ids: _decode(b, i[:, :prompt_len], new_tokens))
                )
                logger.debug(
                    "repeat %d %s: prefill %.4fs decode %.4fs",
                    r,
                    name,
                    bench.prefill_times[-1],
                    bench.decode_times[-1],
                )

    disk_paths = disk_paths or {}
    return {
        name: _result(
            bench,
            batch_size,
            seqlen,
            new_tokens,
            prompt_len,
            directory_size_mb(disk_paths[name]) if name in disk_paths else None,
        )
        for name, bench in benches.items()
    }


@contextmanager
def _all_eval(models: Mapping[str, nn.Module]) -> Iterator[None]:
    """Eval mode for every model at once, restored afterwards."""
    states = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        yield
    finally:
        for name, m in models.items():
            m.train(states[name])


def measure_speed(model: nn.Module, *, disk_path: str | Path | None = None, **workload: Any) -> SpeedResult:
    """Measure one model (see the module docstring for what each number means).

    ``workload`` takes the keyword arguments of ``measure_side_by_side`` (``batch_size``, ``seqlen``,
    ``new_tokens``, ``repeats``, ``warmup``, ``vocab_size``, ``seed``) with the same defaults. To compare
    models, prefer ``measure_side_by_side``: it interleaves their repeats.
    """
    disk_paths = {"model": disk_path} if disk_path is not None else None
    return measure_side_by_side({"model": model}, disk_paths=disk_paths, **workload)["model"]
