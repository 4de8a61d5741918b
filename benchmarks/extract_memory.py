"""How much time and memory does ``extract`` take? Before/after comparison of the extraction algorithm.

Each (model, implementation) pair runs in a fresh subprocess. The worker builds the dense model, then
resets the kernel's RSS high-water mark (``/proc/self/clear_refs``; where that is not allowed, a thread
samples the RSS every millisecond instead), extracts, and reports the peak RSS above the RSS it had
right after building the dense model, next to the dense model's own weight bytes. Models:

* ``smollm2``: the embedded SmolLM2-135M (fp32) with ``examples/smollm2-hand-plan.json`` (reordered);
* ``llama1b``: a random-weight Llama of TinyLlama-1.1B's shape in fp32, with a plan removing ~14%.

For ``llama1b`` the driver also checks that both implementations give identical logits.

    HF_HUB_OFFLINE=1 nice -n 5 .venv/bin/python benchmarks/extract_memory.py [--model all] [--impl both]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from torch import nn

from multipruner import PrunableModel, PruningPlan, load_model, load_plan
from multipruner import extract as new_extract
from multipruner.core.extract import pruned_config

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("smollm2", "llama1b")
IMPLS = ("old", "new")
MB = 2**20


# --- the pre-change implementation, kept only for this comparison ----------------------------------
@torch.no_grad()
def old_extract(prunable: PrunableModel, plan: PruningPlan) -> nn.Module:
    """PRE-CHANGE implementation of ``multipruner.core.checkpoint.extract`` (for comparison only): random
    initialisation of the pruned model, a full clone of the masked state dict, then one device."""
    config, model_cls = pruned_config(prunable.model.config, plan, prunable.layout, prunable.adapter)
    with prunable.trial(plan):
        state = {k: v.detach().contiguous().clone() for k, v in prunable.model.state_dict().items()}
    dtype = next(prunable.model.parameters()).dtype
    pruned = model_cls(config).to(dtype)
    pruned.load_state_dict(state, strict=True)
    pruned.tie_weights()
    return pruned.eval().to(next(prunable.model.parameters()).device)


EXTRACT = {"old": old_extract, "new": new_extract}


# --- dense models and plans -------------------------------------------------------------------------
def smollm2() -> tuple[PrunableModel, PruningPlan]:
    model, _ = load_model("smollm2-135m")
    prunable = PrunableModel.prepare(model, weight_reorder=True)
    return prunable, load_plan(ROOT / "examples" / "smollm2-hand-plan.json", prunable.layout, True)


def random_llama_1b() -> nn.Module:
    """TinyLlama-1.1B's shape, random weights, fp32 on CPU, built without HF's (slow) initialisation."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # to_empty left its buffers uninitialised
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.fill_(1.0)  # norms
            else:
                param.normal_(0.0, 0.02)
    return model.eval()


def llama1b() -> tuple[PrunableModel, PruningPlan]:
    prunable = PrunableModel.prepare(random_llama_1b(), weight_reorder=False)
    layout = prunable.layout
    unit = layout.heads.unit_channels  # (heads / kv heads) * head_dim query channels
    plan = PruningPlan.dense(layout)
    for i in (5, 12, 18):
        plan = plan.without_block("attention", i)
    for i in (8, 16):
        plan = plan.without_block("mlp", i)
    for i, groups in ((3, 1), (10, 1), (15, 2)):
        plan = plan.with_width("attention", i, layout.attention_width - groups * unit)
    for i, width in ((2, 4096), (9, 4096), (14, 3072), (20, 3072)):
        plan = plan.with_width("mlp", i, width)
    return prunable, plan


BUILD = {"smollm2": smollm2, "llama1b": llama1b}


# --- measurement (worker side) ----------------------------------------------------------------------
def weight_bytes(model: nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]  # each shared tensor once
    return sum(t.numel() * t.element_size() for t in tensors)


class PeakRss:
    """The process's RSS high-water mark from ``start()`` on: the kernel's, reset, or else sampled."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.sampled = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.kernel = True
        except OSError:
            self.kernel = False
            self.sampled = self.process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.sampled = max(self.sampled, self.process.memory_info().rss)

    def stop(self) -> int:
        if not self.kernel:
            self._stop.set()
            self._thread.join()
            return max(self.sampled, self.process.memory_info().rss)
        status = Path("/proc/self/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024


def release_free_memory() -> None:
    """Give freed heap memory back to the OS, so that memory freed while building the dense model (GGUF
    decoding, reordering) does not hide the extraction's own allocations in the baseline RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def worker(model_name: str, impl: str, logits_path: str | None) -> dict:
    torch.set_grad_enabled(False)
    prunable, plan = BUILD[model_name]()
    dense_bytes = weight_bytes(prunable.model)
    release_free_memory()
    peak = PeakRss()
    baseline = psutil.Process().memory_info().rss
    peak.start()
    started = time.perf_counter()
    pruned = EXTRACT[impl](prunable, plan)
    seconds = time.perf_counter() - started
    peak_rss = peak.stop()
    if logits_path:
        ids = torch.tensor([[1, 450, 4996, 17354, 1701, 29916, 432, 17204]]) % pruned.config.vocab_size
        torch.save(pruned(ids).logits, logits_path)
    return {
        "model": model_name,
        "impl": impl,
        "dense_mb": dense_bytes / MB,
        "pruned_params": sum(p.numel() for p in pruned.parameters()),
        "dense_params": prunable.layout.dense_params(),
        "seconds": seconds,
        "extra_mb": (peak_rss - baseline) / MB,
        "peak_source": "VmHWM" if peak.kernel else "sampled",
    }


# --- driver -----------------------------------------------------------------------------------------
def run_worker(model_name: str, impl: str, logits_path: str | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model", model_name, "--impl", impl]
    if logits_path:
        cmd += ["--logits", logits_path]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def print_table(rows: list[dict]) -> None:
    header = f"{'model':<8} {'impl':<4} {'dense MB':>9} {'kept %':>8} {'time s':>7} {'extra MB':>9} {'extra/dense':>11}"
    print(header)
    print("-" * len(header))
    for r in rows:
        kept = 100 * r["pruned_params"] / r["dense_params"]
        print(
            f"{r['model']:<8} {r['impl']:<4} {r['dense_mb']:>9.0f} {kept:>8.1f} {r['seconds']:>7.2f} "
            f"{r['extra_mb']:>9.0f} {r['extra_mb'] / r['dense_mb']:>11.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--impl", choices=[*IMPLS, "both"], default="both")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--logits", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model, args.impl, args.logits)))
        return
    models = MODELS if args.model == "all" else (args.model,)
    impls = IMPLS if args.impl == "both" else (args.impl,)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in models:
            for impl in impls:
                logits = f"{tmp}/{model_name}-{impl}.pt" if model_name == "llama1b" else None
                rows.append(run_worker(model_name, impl, logits))
                print(f"done: {model_name} {impl} ({rows[-1]['peak_source']})", file=sys.stderr)
        print_table(rows)
        if "llama1b" in models and len(impls) == 2:
            old, new = (torch.load(f"{tmp}/llama1b-{impl}.pt") for impl in IMPLS)
            assert torch.equal(old, new), "old and new extraction give different logits"
            print(f"llama1b: old and new logits identical ({tuple(new.shape)})")


if __name__ == "__main__":
    main()
