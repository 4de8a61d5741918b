"""The search's candidates split over processes launched by ``torchrun`` (torch.distributed).

Every process holds the whole model and the same calibration tokens (sent by rank 0). At each batch
of each step, a process scores only the candidates whose layer it owns (``layer % world_size``: deep and
shallow layers, cheap and costly tails, alternate between processes, and a candidate stays with the same
process from step to step, keeping its saved states), then all processes exchange the per-sequence
losses. A step whose few candidates all sit on one process's layers runs there alone; such steps are
the cheap ones. Every process then holds every score and makes the same choice; only rank 0 writes the run
directory. On CPU the processes talk over gloo, on GPUs over NCCL (one GPU per process).

The exchange writes into the step's state (step_state.py): :func:`share_batch` after each batch,
:func:`share_exact` when a candidate's put-off LM heads are paid (head_bound.py).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..errors import UsageError

if TYPE_CHECKING:
    from .step_state import StepState

log = logging.getLogger(__name__)


def world_size() -> int:
    """Processes in this launch (1 without torchrun), read from torchrun's environment."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_world_size(num_layers: int) -> None:
    size = world_size()
    if size > num_layers:
        raise UsageError(
            f"torchrun started {size} processes but the model has {num_layers} layers: a step can have as "
            f"few candidates as layers, so the extra processes would have nothing to score. Use "
            f"--nproc-per-node {num_layers} or fewer"
        )


@dataclass(frozen=True)
class Workers:
    """This process's place among the processes sharing a search."""

    rank: int
    size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owner(self, layer: int) -> int:
        return layer % self.size

    def owns(self, layer: int) -> bool:
        return self.owner(layer) == self.rank

    def largest_share(self, layers: Sequence[int]) -> int:
        """How many of these candidates (by first layer) the busiest process scores."""
        return max(Counter(self.owner(layer) for layer in layers).values(), default=0)

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every process."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def owned(workers: Workers | None, members: Iterable[int], first_layers: Sequence[int]) -> list[int]:
    """The candidates among ``members`` this process scores, in order (all of them without torchrun)."""
    return [k for k in sorted(members) if workers is None or workers.owns(first_layers[k])]


def share_batch(workers: Workers, state: StepState, b: int, mine: Sequence[int]) -> None:
    """Every process ends batch ``b`` with every member's losses (or bounds, left pending)."""
    for share in workers.all_gather({k: (state.lower[k][b].cpu(), b in state.nll[k]) for k in mine}):
        for k, (lower, exact) in share.items():
            state.lower[k][b] = lower
            if exact:
                state.nll[k][b] = lower
            else:
                state.pending.add(k)


def share_exact(workers: Workers, state: StepState, k: int) -> None:
    """Every process gets candidate k's exact losses from the process that paid its LM heads."""
    for share in workers.all_gather({b: nll.cpu() for b, nll in state.nll[k].items()}):
        for b, nll in share.items():
            state.nll[k].setdefault(b, nll)
            state.lower[k][b] = state.nll[k][b]


def bind_device(device: torch.device) -> None:
    """Give this process its GPU (LOCAL_RANK) or its share of the CPU cores; call before loading."""
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:  # the machine's cores are shared by the processes on it
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))


def join(device: torch.device) -> Workers:
    """Join the process group of a torchrun launch (waits for the other processes)."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    workers = Workers(dist.get_rank(), dist.get_world_size())
    log.info("process %d of %d shares the search", workers.rank, workers.size)
    return workers
