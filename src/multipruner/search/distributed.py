"""The search's candidates split over processes launched by ``torchrun`` (torch.distributed).

Every process holds the whole model and the same calibration tokens (sent by rank 0). At each batch
of each step, a process scores only the candidates whose layer it owns (``layer % world_size``: deep and
shallow layers, cheap and costly tails, alternate between processes, and a candidate stays with the same
process from step to step, keeping its saved states), then all processes exchange the per-sequence
losses. A step whose few candidates all sit on one process's layers runs there alone; such steps are
the cheap ones. Every process then holds every score and makes the same choice; only rank 0 writes the run
directory. On CPU the processes talk over gloo, on GPUs over NCCL (one GPU per process).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import UsageError

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
