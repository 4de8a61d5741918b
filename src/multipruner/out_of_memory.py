"""Running out of memory is a stop the user can act on: one line naming the settings to lower, every
finished step kept, and ``--resume`` with the lowered setting going on to the same plan."""

from __future__ import annotations

import torch

from .errors import UsageError

# what torch and Python raise when an allocation fails: CUDA's own error, and the host allocator's
# RuntimeError (its message is the only way to tell it from other RuntimeErrors)
_HOST_MESSAGES = ("can't allocate memory", "not enough memory", "out of memory")


class OutOfMemoryStop(UsageError):
    """A phase ran out of device or host memory; what was finished is saved."""


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _HOST_MESSAGES)


def out_of_memory_stop(
    err: BaseException, phase: str, lower: list[str], saved: str, note: str = ""
) -> OutOfMemoryStop:
    """The stop for ``err`` in ``phase``: ``lower`` are the settings (with their values now) that bound its
    memory and may change on a resume; ``saved``: what is kept for it; ``note``: what else would help."""
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return OutOfMemoryStop(
        f"out of memory in the {phase} phase ({first_line}). Lower {' or '.join(lower)} and rerun the same "
        f"command with --resume; {saved}. {note}".rstrip()
    )
