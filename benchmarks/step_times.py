"""Time a few steps of a finished search under today's defaults and under the earlier exact defaults, side
by side in one process, from the same starting plan.

Starts where a finished run was after its first ``--after`` steps (its channel order and plan), runs the
next ``--steps`` steps once per setting, and prints each step's time and choice, then where the time went
(cProfile: tails, LM heads, recording forwards, bounds). Both settings build their calibration sets the
way ``prune`` does: today's 4,096 + 4,096 tokens, KL to the dense model on block steps; the earlier
2,048 + 1,024 tokens, NLL everywhere, every candidate scored exactly.

    .venv/bin/python benchmarks/step_times.py runs/fwd --after 2 --steps 2    # block steps 2-3
    .venv/bin/python benchmarks/step_times.py runs/fwd --after 20 --steps 2   # MLP-width steps 20-21
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from dataclasses import replace
from pathlib import Path

from multipruner.core.surgery import PrunableModel
from multipruner.models import load_model
from multipruner.run.run_dir import RunDirectory
from multipruner.search.calibration import CalibrationSettings
from multipruner.search.kl_objective import DenseTargets, KlObjective
from multipruner.search.loop import StepRecord, new_steps
from multipruner.search.objective import LossSettings, ignored_label
from multipruner.search.scoring import CalibrationScorer
from multipruner.search.settings import SearchSettings
from multipruner.settings import from_dict

# setting -> (calibration set sizes, search settings over the run's own)
SETTINGS = {
    "defaults": ({}, dict(screen_tokens=None)),  # None: the default screen (a missing key reads as 0)
    "earlier": (
        dict(block_tokens=2048, width_tokens=1024),
        dict(objective="nll", screen_tokens=0, width_screen="forward"),
    ),
}
# the scorer's parts, as cProfile names them
PARTS = {
    "tails": "run_tail",
    "LM heads (exact losses)": "per_sequence",
    "recording forwards": "record",
    "bounds (build)": "from_current",
    "bounds (per candidate)": "token_nll",
    "KL bounds (per candidate)": "bound",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--after", type=int, required=True, help="start after the run's first N steps")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--settings", default="defaults,earlier", help=f"of {', '.join(SETTINGS)}")
    args = parser.parse_args()
    run = RunDirectory(args.run)
    manifest = run.manifest()
    model, tokenizer = load_model(manifest.source.spec, dtype=manifest.settings["model"]["dtype"])
    done = [StepRecord.from_dict(r) for r in run.step_records() if r["step"] >= 0][: args.after]
    prunable = PrunableModel.prepare(model, True, run.plan()[0].channel_order)
    run_settings = {k: v for k, v in manifest.settings["search"].items() if k != "max_steps"}
    calibration = manifest.settings["calibration"]
    for name in args.settings.split(","):
        sizes, search = SETTINGS[name]
        settings = from_dict(SearchSettings, {**run_settings, **search})
        settings = replace(settings, max_steps=args.after + args.steps)
        sets = CalibrationSettings(seqlen=calibration["seqlen"], **sizes).build(tokenizer)
        loss = LossSettings(ignore_index=ignored_label(tokenizer), batch_size=calibration["batch_size"])
        prunable.restore()  # the dense model: the KL targets are its outputs
        objectives = {
            k: KlObjective(
                model,
                prunable.adapter,
                loss,
                DenseTargets.compute(
                    model, prunable.adapter, v, top_k=settings.kl_top_k, batch_size=2, chunk_tokens=1024
                ),
            )
            for k, v in sets.items()
            if settings.objective_for(k) == "kl"
        }
        scorers = {
            k: CalibrationScorer(prunable, v, loss, objective=objectives.get(k)) for k, v in sets.items()
        }
        profile = cProfile.Profile()
        started = time.perf_counter()
        profile.enable()
        records = new_steps(prunable, scorers, settings, done)
        profile.disable()
        elapsed = time.perf_counter() - started
        steps = ", ".join(
            f"{r.step} ({r.stage}) {r.elapsed_s:.1f} s -> {r.choice['op']} {r.choice['kind']} {r.choice['layer']}"
            for r in records
        )
        print(f"{name}: {elapsed:.1f} s: {steps}", flush=True)
        totals = {part: 0.0 for part in PARTS}
        for (_, _, function), row in pstats.Stats(profile).stats.items():  # type: ignore[attr-defined]
            for part, wanted in PARTS.items():
                if function == wanted:
                    totals[part] += row[3]  # cumulative time
        print("   " + "; ".join(f"{part} {seconds:.1f} s" for part, seconds in totals.items() if seconds))


if __name__ == "__main__":
    main()
