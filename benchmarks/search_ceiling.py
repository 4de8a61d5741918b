"""How fast could an exact search be on a finished run's steps? Ceilings, counted in work, not timed.

For every step of a run directory, it counts what each way of scoring must compute, in units of one
decoder layer on one calibration sequence (the LM head is ``vocabulary x hidden`` multiply-adds per token,
converted to such units from the layout):

- **full**: one full forward per candidate (every layer and the LM head, every sequence);
- **tails**: each candidate re-runs only the layers from the one it changes, or from the layer the previous
  step changed when it was already a candidate then (perfect cross-step reuse), and only the winner pays
  its LM head (a perfect head bound);
- **tails + racing**: as tails, and every loser stops after the first batch, the most any racing (exact or
  statistical) could skip at the run's batch size.

full / tails and full / (tails + racing) bound the speed-up of any scorer that keeps the exact scores of
the layers it runs; measured speed-ups (``search_speed.py --whole-run``) sit below them.

    .venv/bin/python benchmarks/search_ceiling.py RUN_DIR [--untied-head]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from multipruner.run.run_dir import RunDirectory


def head_in_layers(layout, untied: bool) -> float:
    """The LM head's cost per token in decoder layers (parameters as multiply-adds)."""
    embedding = layout.non_layer_params - layout.hidden_size  # the final norm aside
    head = embedding / 2 if untied else embedding
    layer = layout.attention_params(layout.attention_width) + layout.mlp_params(layout.mlp_width)
    return head / layer


def _identity(candidate: dict) -> tuple:
    """What a candidate changes: the same key across steps, and how a step's choice is named."""
    return candidate["kind"], candidate["op"], candidate["layer"]


def step_work(record: dict, previous: dict | None, layers: int, head: float, batch_size: int):
    """(full, tails, tails + racing) for one step, in layer-sequence units."""
    candidates = [c for c in record["candidates"] if c.get("sequences")]
    sequences = max(c["sequences"] for c in candidates)
    first_batch = min(batch_size, sequences)
    reusable = set()
    if previous is not None and previous["stage"] == record["stage"]:
        reusable = {_identity(c) for c in previous["candidates"]}
        changed = previous["choice"]["layer"]
    full = tails = raced = 0.0
    for cand in candidates:
        first = cand["layer"]
        if _identity(cand) in reusable:
            first = max(first, changed)
        tail = layers - first
        winner = _identity(cand) == _identity(record["choice"])
        full += sequences * (layers + head)
        tails += sequences * tail + (sequences * head if winner else 0.0)
        raced += (sequences * (tail + head)) if winner else first_batch * tail
    return full, tails, raced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument(
        "--untied-head", action="store_true", help="the LM head is not the embedding matrix (counted once)"
    )
    args = parser.parse_args()
    run = RunDirectory(args.run_dir)
    _, layout = run.plan()
    batch_size = run.manifest().settings["calibration"]["batch_size"]
    head = head_in_layers(layout, args.untied_head)
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0])
    previous = None
    for record in run.step_records():
        work = step_work(record, previous, layout.num_layers, head, batch_size)
        for stage in (record["stage"], "whole search"):
            for i, value in enumerate(work):
                totals[stage][i] += value
            totals[stage][3] += 1
        previous = record
    print(
        f"{args.run_dir}: {layout.num_layers} layers, LM head = {head:.1f} layers per token, "
        f"calibration batch size {batch_size}"
    )
    print(f"{'stage':>14} {'steps':>5} {'full / tails':>13} {'full / (tails + racing)':>24}")
    for stage, (full, tails, raced, steps) in totals.items():
        print(f"{stage:>14} {steps:>5} {full / tails:>12.2f}x {full / raced:>23.2f}x")


if __name__ == "__main__":
    main()
