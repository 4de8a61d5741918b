"""Wall-clock timing of work on a device, its queued kernels included (speed benchmarks, latency tables)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def _sync(device: torch.device) -> None:
    """Wait for queued kernels, or CUDA timings would measure only the launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds ``fn`` takes on ``device``, and what it returned."""
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out
