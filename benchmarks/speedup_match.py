"""Which model of a parameter-targeted search has a given measured speed-up? Bisection on --target-ratio.

A greedy search that ranks every dimension together (``--distribution auto``) makes the same steps
whatever its target and only stops at it, so the model ``--target-ratio R`` gives is a prefix of a longer
run's steps: the first step whose ratio reaches R. This bisects R over one finished run's steps, extracts
each probe from a fresh copy of the dense model and times it against the dense model on one workload
(search/latency.py's timer, the one a latency budget is searched and benched with), until the measured
speed-up brackets ``--speedup``. The step nearest to it is written as a plan, to evaluate held out.

    .venv/bin/python benchmarks/speedup_match.py runs/auto20 --speedup 1.25 --out runs/match125.json
    multipruner eval --model smollm2-135m --plan runs/match125.plan.json --tasks wikitext2,ptb --max-windows 32

(A staged ``a:b:c`` search is not a prefix of a longer one: each stage's share scales with the target,
so matching it needs one search per probe.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from multipruner.core.extract import extract
from multipruner.core.layout import layout_of
from multipruner.core.surgery import PrunableModel
from multipruner.io_utils import atomic_write_text
from multipruner.models import load_model
from multipruner.run.run_dir import RunDirectory
from multipruner.search.latency import measured_speedup
from multipruner.search.loop import StepRecord, plan_from_record
from multipruner.search.settings import SearchSettings
from multipruner.settings import from_dict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished --distribution auto run targeting parameters")
    parser.add_argument("--speedup", type=float, required=True, help="the measured speed-up to match")
    parser.add_argument("--kind", choices=("decode", "prefill"), default="decode")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, required=True, help="OUT.json: the probes; OUT.plan.json: the match"
    )
    args = parser.parse_args()
    run = RunDirectory(args.run)
    manifest = run.manifest()
    search = from_dict(SearchSettings, manifest.settings["search"])
    if not search.auto:
        raise SystemExit(f"{args.run} is a staged search: its smaller targets are not prefixes of it")
    final, _ = run.plan()
    records = [StepRecord.from_dict(r) for r in run.step_records()]
    dense, _ = load_model(manifest.source.spec)
    workload = (args.kind, args.batch_size, args.context)
    layout = layout_of(dense)
    settings = search.resolved(layout)

    def plan_at(step: int):
        return plan_from_record(records[step], layout, settings, final.channel_order)

    probes: dict[int, float] = {}

    def speedup_at(step: int) -> float:
        if step not in probes:
            fresh, _ = load_model(manifest.source.spec)
            plan = plan_at(step)
            pruned = extract(PrunableModel.from_plan(fresh, plan), plan)
            probes[step] = measured_speedup(dense, pruned, workload, args.repeats)
            print(
                f"step {step}: ratio {records[step].ratio:.2f} %, measured {args.kind} speed-up {probes[step]:.3f}x"
            )
        return probes[step]

    low, high = 0, len(records) - 1  # the first step at or above the speed-up lies in [low, high]
    if speedup_at(high) < args.speedup:
        raise SystemExit(f"the run's last step is only {probes[high]:.3f}x: prune a longer run")
    while low < high:
        middle = (low + high) // 2
        if speedup_at(middle) < args.speedup:
            low = middle + 1
        else:
            high = middle
    nearest = min((s for s in (high - 1, high) if s >= 0), key=lambda s: abs(speedup_at(s) - args.speedup))
    plan = plan_at(nearest)
    plan.save(args.out.with_suffix(".plan.json"), layout)
    result = {
        "run": str(args.run),
        "workload": {"kind": args.kind, "batch_size": args.batch_size, "context": args.context},
        "repeats": args.repeats,
        "target_speedup": args.speedup,
        "probes": [{"step": s, "ratio": records[s].ratio, "speedup": probes[s]} for s in sorted(probes)],
        "match": {"step": nearest, "ratio": records[nearest].ratio, "speedup": probes[nearest]},
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"nearest: step {nearest}, ratio {records[nearest].ratio:.2f} %, {probes[nearest]:.3f}x")


if __name__ == "__main__":
    main()
