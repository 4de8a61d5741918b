"""Deterministic fault points, so tests can break a run at an exact place instead of racing a timer.

``MULTIPRUNER_KILL_AT=<point>`` (or ``<point>:<n>``) makes the process SIGKILL itself the n-th time
(default: the first) it reaches ``crash_point("<point>")``; ``MULTIPRUNER_OOM_AT=<point>[:<n>]`` makes
that reach fail as a host allocation does (torch's message). Unset, a fault point costs two dict lookups.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "MULTIPRUNER_KILL_AT"
OOM_ENV = "MULTIPRUNER_OOM_AT"
_reached: Counter[tuple[str, str]] = Counter()


def crash_point(point: str) -> None:
    for env in (ENV, OOM_ENV):
        spec = os.environ.get(env)
        if not spec:
            continue
        name, _, count = spec.partition(":")
        if name != point:
            continue
        _reached[env, point] += 1
        if _reached[env, point] != int(count or 1):
            continue
        if env == ENV:
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(
            f"[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
            f"allocate 1073741824 bytes (injected by {OOM_ENV}={spec})"
        )


def reset() -> None:
    """Forget how often each point was reached (tests that run several commands in one process)."""
    _reached.clear()
