"""One block-stage step on SmolLM2-135M, every candidate scored two ways, in one run:

(a) the reference's way: apply the candidate, full forward, full logits, shifted cross entropy;
(b) multipruner's CalibrationScorer (recorded layer inputs, tail re-runs, chunked loss, cross-step reuse).

Step 0 has no earlier states to reuse, so the script scores step 0 with (b), applies its choice as the
search would, then times steps 1..N (``--steps``) with both (a) and (b), checks that they rank the
candidates alike, and applies each step's choice.

    .venv/bin/python benchmarks/search_speed.py [--device cpu|cuda] [--dtype float32|bfloat16] [--sequences 4] [--seqlen 512] [--steps 1]

``--whole-run N`` instead runs the search itself (the main job's settings and default calibration
sets) for N steps once per mode (``--modes``: one full forward per candidate, the scorer without
racing, exact racing with and without the head bound, fast), optionally from a finished run's plan
after K steps (``--after-steps RUN_DIR:K``), and reports each mode's time, the candidate-batches racing
skipped and those whose LM head the bound spared, and whether its steps chose what the first mode chose.

``--random-shape llama-8b`` (with ``--tokenizer DIR`` and ``--calibration PATH``) replaces the model by a
Llama-3.1-8B-shaped one with random weights, for GPU timings where no 8B checkpoint is at hand: its
timings are real, its choices are not meaningful (every candidate scores about alike).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import threading
import time
from dataclasses import replace

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from multipruner.core.surgery import PrunableModel
from multipruner.models import load_model, resolve_dtype
from multipruner.run.run_dir import RunDirectory
from multipruner.search.calibration import CalibrationSettings
from multipruner.search.loop import StepRecord, initial_plan, new_steps
from multipruner.search.objective import LossSettings, full_forward_perplexity, ignored_label
from multipruner.search.scoring import CalibrationScorer, StepScores
from multipruner.search.settings import SearchSettings
from multipruner.search.stages import block_candidates

# random-weight shapes for timing where the real checkpoint is out of reach (llama-tiny: a dry run)
RANDOM_SHAPES = {
    "llama-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
        rope_parameters={"rope_theta": 500000.0, "rope_type": "default"},
    ),
    "llama-tiny": dict(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=49152,
    ),
}


def random_model(shape: str, tokenizer_dir: str, dtype: str, device: str):
    """``(model, tokenizer)``: a Llama of the named shape with seeded random weights, built on ``device``."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(**RANDOM_SHAPES[shape], max_position_embeddings=8192)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(resolve_dtype(dtype, torch.device(device)))
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return model, tokenizer


class PeakRss:
    """Samples this process's resident memory; reports the peak above the level at entry."""

    def __enter__(self):
        # hand freed heap back to the OS first, or the previous phase's memory hides this one's peak
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.mb = (self.peak - self.base) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1, help="block steps after step 0 to time both ways")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--whole-run", type=int, default=0, metavar="N", help="compare racing modes over N steps"
    )
    parser.add_argument(
        "--whole-run-tokens",
        type=int,
        default=None,
        help="tokens per calibration set (default: prune's defaults)",
    )
    parser.add_argument(
        "--modes",
        default="full,off,exact-nobound,exact",
        help=f"whole run: the modes to time, the first is the reference ({', '.join(WHOLE_RUN_MODES)})",
    )
    parser.add_argument(
        "--random-shape",
        choices=sorted(RANDOM_SHAPES),
        default=None,
        help="whole run: a random-weight model of this shape instead of --model (needs --tokenizer)",
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory for --random-shape")
    parser.add_argument(
        "--calibration", default="default", help="whole run: calibration source (prune's --calibration)"
    )
    parser.add_argument(
        "--after-steps",
        default=None,
        metavar="RUN_DIR:K",
        help="whole run: start from a finished run's plan after its first K steps (e.g. in the width stage)",
    )
    args = parser.parse_args()
    if args.whole_run:
        return whole_run(args)

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    prunable = PrunableModel.prepare(model, weight_reorder=True)
    tokens = CalibrationSettings(seqlen=args.seqlen, block_tokens=args.sequences * args.seqlen).build(
        tokenizer
    )["block"]
    loss = LossSettings(ignore_index=ignored_label(tokenizer), batch_size=args.batch_size)
    settings = SearchSettings(
        target_ratio=10.0, distribution=(44, 52, 4), mlp_group_size=128, attention_group_size=192
    )
    scorer = CalibrationScorer(prunable, tokens, loss, args.device)
    print(
        f"model {args.model} {args.dtype}; calibration {tuple(tokens.shape)}; {torch.get_num_threads()} threads"
    )

    def fast_step(plan):
        cands = block_candidates(plan, settings)
        started = time.perf_counter()
        with PeakRss() as mem:
            scores = scorer.score([c.apply(plan) for c in cands], [c.layer for c in cands], keys=cands)
        return cands, scores.ppl, time.perf_counter() - started, mem.mb

    plan = initial_plan(prunable.layout, settings)
    cands0, scores0, t0, _ = fast_step(plan)
    best0 = min(range(len(scores0)), key=lambda k: (scores0[k], k))
    plan = cands0[best0].apply(plan)
    prunable.apply(plan)
    print(f"step 0: {len(cands0)} candidates, multipruner {t0:.1f}s; chose {cands0[best0]}")

    def ranking(values):
        return sorted(range(len(values)), key=lambda k: (values[k], k))

    totals = {"a": 0.0, "b": 0.0, "layers_a": 0, "layers_b": 0}
    for step in range(1, args.steps + 1):
        cands = block_candidates(plan, settings)
        started = time.perf_counter()
        with PeakRss() as mem:
            brute = []
            for cand in cands:
                with prunable.trial(cand.apply(plan)):
                    brute.append(full_forward_perplexity(model, tokens, loss))
        t_brute, mem_brute = time.perf_counter() - started, mem.mb
        layers_before = scorer.layers_run
        cands, fast, t_fast, mem_fast = fast_step(plan)
        layers_fast = scorer.layers_run - layers_before
        batches = -(-tokens.shape[0] // args.batch_size)
        layers_brute = len(cands) * batches * prunable.layout.num_layers
        same_choice = ranking(fast)[0] == ranking(brute)[0]
        max_rel = max(abs(a - b) / b for a, b in zip(fast, brute, strict=True))
        print(f"step {step}: {len(cands)} candidates")
        print(f"  (a) full forward per candidate: {t_brute:8.1f}s  peak +{mem_brute:7.0f} MiB")
        print(f"  (b) multipruner scorer:         {t_fast:8.1f}s  peak +{mem_fast:7.0f} MiB")
        print(
            f"  speed-up (a)/(b): {t_brute / t_fast:.2f}x   decoder-layer forwards (a) {layers_brute}, "
            f"(b) {layers_fast} ({layers_brute / layers_fast:.2f}x fewer; both run the LM head per candidate and batch)"
        )
        print(
            f"  same choice: {same_choice} ({cands[ranking(fast)[0]]}); identical ranking: "
            f"{ranking(fast) == ranking(brute)}; max relative ppl difference {max_rel:.2e}"
        )
        totals["a"] += t_brute
        totals["b"] += t_fast
        totals["layers_a"] += layers_brute
        totals["layers_b"] += layers_fast
        best = ranking(fast)[0]
        plan = cands[best].apply(plan)
        prunable.apply(plan)
    print(
        f"steps 1-{args.steps}: (a) {totals['a']:.1f}s, (b) {totals['b']:.1f}s, speed-up {totals['a'] / totals['b']:.2f}x; "
        f"step 0 (nothing to reuse yet) would be {t0:.1f}s for (b)"
    )


class FullForwardScorer:
    """The reference's way as a scorer: every candidate applied, one full forward, full logits."""

    def __init__(self, prunable, tokens, loss):
        self.prunable, self.tokens, self.settings = prunable, tokens, loss

    def score(self, plans, first_layers, keys=None, on_batch=None, race=None) -> StepScores:
        ppl = []
        for plan in plans:
            with self.prunable.trial(plan):
                ppl.append(full_forward_perplexity(self.prunable.model, self.tokens, self.settings))
        n = self.tokens.shape[0]
        batches = -(-n // self.settings.batch_size) * len(plans)
        return StepScores(ppl, ppl, [n] * len(plans), [torch.empty(0)] * len(plans), 0, batches)


# mode -> (scorer, racing mode, head-bound top-k, layer-major MB per call)
WHOLE_RUN_MODES = {
    "full": ("full", "off", 0, 0),  # one full forward per candidate (the reference's way)
    "off": ("calibration", "off", 0, 0),  # recorded layer inputs and tail re-runs, every candidate finished
    "exact-nobound": ("calibration", "exact", 0, 0),  # racing on partial sums only
    "exact": ("calibration", "exact", 16, 0),  # + the head bound (the default)
    "exact-layermajor": ("calibration", "exact", 16, 8192),  # + candidates joined per layer (for GPUs)
    "fast": ("calibration", "fast", 16, 0),
}


def _chosen(record: StepRecord) -> tuple:
    return record.choice["op"], record.choice["kind"], record.choice["layer"]


def whole_run(args) -> None:
    """The search for ``args.whole_run`` steps once per mode, on the main job's settings."""
    if args.random_shape:
        model, tokenizer = random_model(args.random_shape, args.tokenizer, args.dtype, args.device)
    else:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    done, order = [], None
    if args.after_steps:  # start where a finished run was after its first K steps
        run_dir, k = args.after_steps.rsplit(":", 1)
        run = RunDirectory(run_dir)
        done = [StepRecord.from_dict(r) for r in run.step_records() if r["step"] >= 0][: int(k)]
        # its later steps only mean something with its channel order (by activations, or L1 if none)
        order = run.plan()[0].channel_order
    prunable = PrunableModel.prepare(model, weight_reorder=True, channel_order=order)
    sizes = (
        {}
        if args.whole_run_tokens is None
        else dict(block_tokens=args.whole_run_tokens, width_tokens=args.whole_run_tokens)
    )
    sets = CalibrationSettings(calibration_dataset=args.calibration, seqlen=args.seqlen, **sizes).build(
        tokenizer
    )
    base = dict(target_ratio=10.0, distribution=(44, 52, 4), mlp_group_size=128, attention_group_size=192)
    if args.model != "smollm2-135m" or args.random_shape:
        base = dict(target_ratio=10.0)
    results = {}
    for mode in args.modes.split(","):
        kind, race, top_k, layer_major_mb = WHOLE_RUN_MODES[mode]
        loss = LossSettings(
            ignore_index=ignored_label(tokenizer),
            batch_size=args.batch_size,
            head_bound_top_k=top_k,
            layer_major_budget_mb=layer_major_mb,
        )
        # the exact scorer on every candidate, by NLL (today's defaults screen, and score block steps by KL,
        # which these scorers are not given)
        exact = dict(objective="nll", screen_tokens=0, width_screen="forward")
        settings = replace(SearchSettings(**base, **exact, search=race), max_steps=len(done) + args.whole_run)
        if kind == "full":
            scorers = {k: FullForwardScorer(prunable, v, loss) for k, v in sets.items()}
        else:
            scorers = {k: CalibrationScorer(prunable, v, loss, args.device) for k, v in sets.items()}
        started = time.perf_counter()
        records = new_steps(prunable, scorers, settings, done)
        elapsed = time.perf_counter() - started
        peak = ""
        if torch.cuda.is_available() and args.device.startswith("cuda"):
            peak = f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
            torch.cuda.reset_peak_memory_stats()
        prunable.restore()
        results[mode] = (elapsed, records)
        skipped = sum(r.skipped_batches for r in records)
        bounded = sum(r.bounded_batches for r in records)
        total = sum(r.total_batches for r in records)
        print(
            f"{mode:>16}: {len(records)} steps in {elapsed:7.1f} s; of {total} candidate-batches racing skipped "
            f"{skipped}, and the head bound spared the LM head of {bounded}; "
            f"choices {[_chosen(r) for r in records]}{peak}",
            flush=True,
        )
    # one full forward per candidate is what the others are measured against, wherever it ran
    reference = "full" if "full" in results else next(iter(results))
    ref_time, ref_records = results[reference]
    for mode, (elapsed, records) in results.items():
        # the choice itself; its recorded perplexity differs between scorers in the last float digits
        same = [_chosen(r) == _chosen(o) for r, o in zip(records, ref_records, strict=True)]
        print(
            f"{mode:>16}: {ref_time / elapsed:.2f}x faster than {reference}; "
            f"same choice in {sum(same)} of {len(same)} steps"
        )


if __name__ == "__main__":
    main()
