"""The `prune` job end to end: check inputs, calibrate, search (resumable), extract, evaluate."""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field

import torch

from .data import build_calibration_sets
from .export import extract, prepare_dense, save_pruned
from .io_utils import atomic_write_text
from .layout import ModelLayout
from .models import load_model
from .run_dir import RunDirectory
from .scoring import CalibrationScorer, LossSettings
from .search import SearchConfigError, SearchSettings, run_search

log = logging.getLogger(__name__)


@dataclass
class PruneJob:
    model: str = "smollm2-135m"
    output_path: str = "runs/smollm2-135m"
    target_ratio: float = 10.0
    distribution: tuple[float, float, float] = (44.0, 52.0, 4.0)
    mlp_group_size: int | None = None  # None: about 1/12 of the MLP width
    attention_group_size: int | None = None  # None: one KV group of heads
    weight_reorder: bool = True
    calibration_dataset: str = "default"
    num_calibration_samples_block: int = 64
    num_calibration_samples_width: int = 32
    seqlen: int = 512
    dtype: str = "float32"
    device: str = "cpu"
    batch_size: int = 2
    seed: int = 42
    max_steps: int | None = None
    resume: bool = False
    extract: bool = False
    do_eval: bool = False
    eval_tasks: list[str] = field(
        default_factory=lambda: ["wikitext2", "piqa", "arc_easy", "boolq", "hellaswag"]
    )
    eval_limit: int | None = 200
    eval_seqlen: int = 2048
    progress: bool = True


def default_mlp_group_size(width: int) -> int:
    """The divisor of ``width`` nearest to width/12 (the authors use ~1/11-1/14 of the MLP width)."""
    divisors = [d for d in range(1, width + 1) if width % d == 0]
    return min(divisors, key=lambda d: (abs(d - width / 12), -d))


def resolve_settings(job: PruneJob, layout: ModelLayout) -> SearchSettings:
    settings = SearchSettings(
        target_ratio=job.target_ratio,
        distribution=tuple(job.distribution),
        mlp_group_size=job.mlp_group_size or default_mlp_group_size(layout.mlp_width),
        attention_group_size=job.attention_group_size or layout.heads.unit_channels,
        weight_reorder=job.weight_reorder,
        max_steps=job.max_steps,
    )
    settings.validate(layout)
    return settings


def check_seqlen(model, seqlen: int) -> None:
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if seqlen < 2:
        raise SearchConfigError(f"--seqlen must be at least 2, got {seqlen}")
    if limit and seqlen > limit:
        raise SearchConfigError(f"--seqlen {seqlen} is longer than the model's context ({limit} tokens)")


def run_settings(job: PruneJob, settings: SearchSettings) -> dict:
    data = asdict(job)
    data.update(
        mlp_group_size=settings.mlp_group_size,
        attention_group_size=settings.attention_group_size,
        distribution=list(settings.distribution),
    )
    return data


def prune(job: PruneJob) -> dict:
    """Run the job; returns a summary (also printed by the CLI)."""
    started = time.perf_counter()
    from .layout import layout_of

    if not 0 < job.target_ratio < 100:  # checked again with the model; this one costs nothing
        raise SearchConfigError(f"target ratio must be in (0, 100) percent, got {job.target_ratio}")

    model, tokenizer = load_model(job.model, dtype=job.dtype, device=job.device)
    layout = layout_of(model)
    settings = resolve_settings(job, layout)  # fails before any heavy work
    check_seqlen(model, job.seqlen)
    run = RunDirectory(job.output_path)
    calibration = run.load_calibration() if job.resume else None
    fresh_calibration = calibration is None
    if fresh_calibration:  # built before anything is written, so bad data leaves no half-started run
        calibration = build_calibration_sets(
            job.calibration_dataset,
            tokenizer,
            num_samples_block=job.num_calibration_samples_block,
            num_samples_width=job.num_calibration_samples_width,
            seqlen=job.seqlen,
            seed=job.seed,
        )
    done = run.start(run_settings(job, settings), resume=job.resume)
    if fresh_calibration:
        run.save_calibration(calibration)
    log.info(
        "calibration: block %s tokens, width %s tokens",
        tuple(calibration["block"].shape),
        tuple(calibration["width"].shape),
    )

    random.seed(job.seed)
    torch.manual_seed(job.seed)
    prunable = prepare_dense(model, settings.weight_reorder)
    loss = LossSettings(ignore_index=tokenizer.eos_token_id, batch_size=job.batch_size)
    scorers = {k: CalibrationScorer(prunable, v, loss, job.device) for k, v in calibration.items()}
    dense = run.dense_record()
    if dense is None:
        dense = {
            "step": -1,
            "stage": "dense",
            "ppl": scorers["block"].perplexity(),
            "ppl_width": scorers["width"].perplexity(),
            "ratio": 0.0,
            "params": layout.dense_params(),
        }
        run.append_step(dense)
    log.info("dense calibration perplexity: block set %.3f, width set %.3f", dense["ppl"], dense["ppl_width"])

    def on_step(record, plan):
        run.append_step(record.to_dict())
        run.save_plan(plan, layout)

    plan = run_search(prunable, scorers, settings, done_steps=done, on_step=on_step, progress=job.progress)
    run.save_plan(plan, layout)
    prunable.apply(plan)
    summary = {
        "model": job.model,
        "output_path": str(run.path),
        "dense_params": layout.dense_params(),
        "pruned_params": plan.num_params(layout),
        "ratio": plan.ratio(layout),
        "dense_ppl_block": dense["ppl"],
        "pruned_ppl_block": scorers["block"].perplexity(),
        "dense_ppl_width": dense["ppl_width"],
        "pruned_ppl_width": scorers["width"].perplexity(),
        "plan": plan.to_reference(),
        "wall_s": time.perf_counter() - started,
    }
    if job.extract or job.do_eval:
        pruned = extract(prunable, plan)
        if job.extract:
            save_pruned(pruned, tokenizer, run.path / "model", plan, layout, overwrite=True)
            summary["model_dir"] = str(run.path / "model")
        if job.do_eval:
            from .evaluation.runner import evaluate, write_results

            prunable.restore()
            summary["eval"] = {}
            for name, candidate in (("dense", model), ("pruned", pruned)):
                result = evaluate(
                    candidate,
                    tokenizer,
                    job.eval_tasks,
                    limit=job.eval_limit,
                    seqlen=job.eval_seqlen,
                    dense_params=layout.dense_params(),
                    progress=job.progress,
                )
                write_results(result, run.path / f"eval_{name}.json")
                summary["eval"][name] = result
    summary["wall_s"] = time.perf_counter() - started
    atomic_write_text(
        run.path / "summary.json", json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=2)
    )
    return summary
