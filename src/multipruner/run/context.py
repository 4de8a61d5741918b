"""What the phases of ``multipruner prune`` share: the job, the run directory, and the dense model once
loaded (reordered for the search), with the plan the run holds."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from ..core.checkpoint import load_pruned
from ..core.extract import extract
from ..core.importance import CHANNEL_IMPORTANCE
from ..core.layout import ModelLayout, layout_of
from ..core.offload import PageRelease, map_layers_from_disk
from ..core.plan import PruningPlan
from ..core.surgery import PrunableModel
from ..errors import UsageError
from ..model_sources import describe_source
from ..search.distributed import Workers, check_world_size
from ..search.kl_objective import DenseTargets, KlObjective
from ..search.objective import LossSettings, Objective, ignored_label
from ..search.scoring import CalibrationScorer
from ..search.settings import SearchConfigError, SearchSettings
from .run_dir import MODEL_STAGES, ModelSource, RunDirectory, RunDirError

if TYPE_CHECKING:
    from .pipeline import PruneJob

log = logging.getLogger(__name__)


class RunContext:
    """What the phases share: the job, the run directory, and the dense model once loaded."""

    def __init__(self, job: PruneJob, run: RunDirectory):
        self.job, self.run = job, run
        self.workers: Workers | None = None  # the other processes of a torchrun launch
        self._workers_released = False
        self.model = self.tokenizer = self.prunable = None
        self.layout: ModelLayout | None = None
        self.search: SearchSettings | None = None
        self.plan: PruningPlan | None = None
        self.calibration: dict[str, torch.Tensor] | None = None
        self.page_release: PageRelease | None = None  # --offload disk

    def load(self) -> None:
        """Load the dense model, check the model-dependent settings and reorder it (once)."""
        if self.model is not None:
            return
        self.model, self.tokenizer = self.job.model.load()
        if getattr(self.model.config, "pruned_structure", None) is not None:
            raise UsageError(
                f"{self.job.model.model} is a model multipruner already pruned; searching it again would "
                "stack plans that no file records. Prune its dense source with a higher --target-ratio "
                "instead (its multipruner_plan.json names the source)"
            )
        self.layout = layout_of(self.model)
        check_world_size(self.layout.num_layers)
        self.search = self.job.search.resolved(self.layout, next(self.model.parameters()).element_size())
        check_seqlen(self.model, self.job.calibration.seqlen)
        stored = self.run.plan()
        order = stored[0].channel_order if stored else None
        # an order by activations needs the calibration sets: the search phase makes it (order_channels)
        deferred = self.search.orders_by_activations and order is None
        reorder = self.search.weight_reorder and not deferred
        self.prunable = PrunableModel.prepare(self.model, reorder, order)
        if self.job.model.offload == "disk":
            self.page_release = PageRelease(self.model, self.prunable.adapter)
            if reorder:
                self._map_reordered_layers()

    def order_channels(self, calibration: dict[str, torch.Tensor]) -> None:
        """Order the channels by their activations on both calibration sets, unless already ordered."""
        if self.search.orders_by_activations and self.prunable.channel_order is None:
            started = time.perf_counter()
            importance = CHANNEL_IMPORTANCE[self.search.channel_importance]
            order = importance.order(
                self.model, calibration, self.job.calibration.batch_size, self.prunable.adapter
            )
            self.prunable.order_channels(order)
            if self.page_release is not None:
                self._map_reordered_layers()
            log.info(
                "channels ordered by activations on %d tokens (%.1fs)",
                sum(t.numel() for t in calibration.values()),
                time.perf_counter() - started,
            )

    def _map_reordered_layers(self) -> None:
        """--offload disk: the reordered layers go to shards in the run directory and are mapped from there."""
        started = time.perf_counter()
        map_layers_from_disk(self.model, self.prunable.adapter, self.run.path / "offload")
        self.page_release.refresh()
        log.info(
            "offload: reordered layers mapped from %s (%.1fs)",
            self.run.path / "offload",
            time.perf_counter() - started,
        )

    def source(self) -> ModelSource:
        return ModelSource(**describe_source(self.job.model.model))

    def scorers(self, calibration: dict[str, torch.Tensor]) -> dict[str, CalibrationScorer]:
        """One scorer per calibration set, as every process of the search builds them."""
        job = self.job
        loss = LossSettings(
            ignore_index=ignored_label(self.tokenizer),
            batch_size=job.calibration.batch_size,
            layer_major_budget_mb=self.search.layer_major_mb,
            reuse_budget_mb=self.search.reuse_mb,
            head_bound_budget_mb=self.search.reuse_mb,
        )
        device = job.model.torch_device()
        return {
            k: CalibrationScorer(
                self.prunable, v, loss, device, self.workers, self._objective(k, v, loss, device)
            )
            for k, v in calibration.items()
        }

    def _objective(
        self, name: str, tokens: torch.Tensor, loss: LossSettings, device: torch.device
    ) -> Objective | None:
        """The search's loss on calibration set ``name``: None for NLL (the scorer's own); for KL, the dense
        model's distribution on these tokens, computed now (the model is still dense here, also on a resume)."""
        if self.search.objective_for(name) == "nll":
            return None
        started = time.perf_counter()
        targets = DenseTargets.compute(
            self.model,
            self.prunable.adapter,
            tokens,
            top_k=self.search.kl_top_k,
            batch_size=loss.batch_size,
            chunk_tokens=loss.chunk_tokens,
            device=device,
        )
        log.info(
            "dense targets for --objective kl on %d tokens (%.1fs)",
            tokens.numel(),
            time.perf_counter() - started,
        )
        return KlObjective(self.model, self.prunable.adapter, loss, targets)

    def release_workers(self, search: dict | None = None) -> None:
        """Rank 0: send the other processes the search to share (its calibration tokens and the steps
        already done), or None when there is none to run. Called once; a no-op without torchrun."""
        if self.workers is not None and not self._workers_released:
            self.workers.broadcast(search)
            self._workers_released = True

    def stages(self) -> list[str]:
        """The models this job makes, in order (the plain pruned one always)."""
        wanted = {"compensated": self.job.run.compensate, "recovered": self.job.run.recover}
        return [stage for stage in MODEL_STAGES if stage == "pruned" or wanted[stage]]

    def stage_model(self, stage: str):
        """A stage's model as the run saved it; the plain pruned one is extracted when not saved."""
        path = self.run.stage_dir(stage)
        if path.is_dir():
            return load_pruned(
                path, dtype=self.job.model.torch_dtype(), device=self.job.model.torch_device()
            )[0]
        if stage != "pruned":
            raise RunDirError(f"{path} is missing: run the {stage} phase first")
        return extract(self.prunable, self.current_plan())

    def current_plan(self) -> PruningPlan:
        if self.plan is None:
            stored = self.run.plan()
            if stored is None:
                raise RunDirError(f"{self.run.path} has no plan.json: the search has not finished")
            self.plan = stored[0]
        return self.plan


def check_seqlen(model, seqlen: int) -> None:
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if limit and seqlen > limit:
        raise SearchConfigError(f"--seqlen {seqlen} is longer than the model's context ({limit} tokens)")
