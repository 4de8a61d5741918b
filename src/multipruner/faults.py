"""Deterministic crash points, so tests can kill a run at an exact place instead of racing a timer.

``MULTIPRUNER_KILL_AT=<point>`` (or ``<point>:<n>``) makes the process SIGKILL itself the n-th time
(default: the first) it reaches ``crash_point("<point>")``. Unset, a crash point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "MULTIPRUNER_KILL_AT"
_reached: Counter[str] = Counter()


def crash_point(point: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name != point:
        return
    _reached[point] += 1
    if _reached[point] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
