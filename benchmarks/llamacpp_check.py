"""A pruned model in llama.cpp: export dense and pruned to GGUF, check them against transformers, time them.

For each model (the pruned one and its dense source) and each --outtypes entry:
  * WikiText-2 test perplexity on the first --windows windows of --seqlen tokens, in transformers and in
    llama.cpp on the *same token ids* (the EOS label left out in both, as `multipruner eval` does);
  * the next-token logits of a prompt: max |difference| / max |logit|;
  * llama.cpp speed: prompt processing (one --prompt-tokens prompt) and greedy generation
    (--new-tokens tokens), tokens/s, median of --repeats runs taken in alternation with the other
    model, with --threads threads.

    .venv/bin/python benchmarks/llamacpp_check.py --model runs/smollm2-135m/model --out-dir runs/gguf
    # add --no-repack on a CPU with AMX (lscpu | grep amx): llama.cpp's repacked weights crash there
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import llama_cpp
import numpy as np
import torch
from llama_cpp import Llama

from multipruner.data import eval_token_stream
from multipruner.evaluation.perplexity import stream_perplexity
from multipruner.export.gguf import export_gguf, vocabulary_gguf
from multipruner.model_sources import dense_source_of
from multipruner.models import load_model
from multipruner.search.objective import ignored_label

PROMPT = "The history of the city begins in the early Middle Ages, when"


def llama_cpp_perplexity(llm: Llama, windows: torch.Tensor, ignore: int | None) -> float:
    total, count = 0.0, 0
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window)], dtype=np.float64)[:-1]
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        labels = np.asarray(window[1:])
        keep = labels != ignore if ignore is not None else np.ones_like(labels, dtype=bool)
        total -= logp[np.arange(len(labels)), labels][keep].sum()
        count += int(keep.sum())
    return float(np.exp(total / count))


def _greedy_next(llm: Llama) -> int:
    # without logits_all, llama-cpp-python keeps no scores: read the context's last logits directly
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),))
    return int(np.argmax(logits))


def _time_once(llm: Llama, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill tokens/s, greedy decode tokens/s) of one run."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = len(prompt) / (time.perf_counter() - start)
    token = _greedy_next(llm)
    start = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([token])
        token = _greedy_next(llm)
    return prefill, new_tokens / (time.perf_counter() - start)


def speeds(paths: dict[str, Path], args) -> dict[str, dict]:
    """Both models timed in alternation (dense, pruned, dense, ...) so drift hits both alike; medians."""
    ctx = args.prompt_tokens + args.new_tokens + 8
    llms = {
        name: Llama(model_path=str(p), n_ctx=ctx, n_batch=512, n_threads=args.threads, verbose=False)
        for name, p in paths.items()
    }
    generator = torch.Generator().manual_seed(0)
    prompt = [int(t) for t in torch.randint(100, 1000, (args.prompt_tokens,), generator=generator)]
    runs: dict[str, list] = {name: [] for name in llms}
    for _ in range(args.repeats):
        for name, llm in llms.items():
            runs[name].append(_time_once(llm, prompt, args.new_tokens))
    for llm in llms.values():
        llm.close()
    return {
        name: {
            "prefill_tok_s": statistics.median(r[0] for r in timed),
            "decode_tok_s": statistics.median(r[1] for r in timed),
        }
        for name, timed in runs.items()
    }


def check(name: str, spec: str, args) -> dict:
    model, tokenizer = load_model(spec)
    ignore = ignored_label(tokenizer)
    stream = eval_token_stream("wikitext2", tokenizer)[: args.windows * args.seqlen]
    windows = stream.view(args.windows, args.seqlen)
    hf_ppl = stream_perplexity(model, stream, seqlen=args.seqlen, ignore_index=ignore, progress=False)
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        hf_logits = model(prompt).logits[0, -1].double().numpy()
    row = {
        "model": name,
        "spec": spec,
        "params": sum(p.numel() for p in model.parameters()),
        "hf_ppl": hf_ppl,
    }
    for outtype in args.outtypes.split(","):
        path = args.out_dir / f"{name}-{outtype}.gguf"
        export_gguf(
            model, path, outtype=outtype, overwrite=True, tokenizer=tokenizer,
            tokenizer_dir=Path(spec) if Path(spec).is_dir() else None, tokenizer_gguf=vocabulary_gguf(spec), name=name,
        )  # fmt: skip
        llm = Llama(
            model_path=str(path),
            n_ctx=args.seqlen,
            n_batch=args.seqlen,
            logits_all=True,
            n_threads=args.threads,
            verbose=False,
        )
        ppl = llama_cpp_perplexity(llm, windows, ignore)
        llm.reset()
        llm.eval(prompt[0].tolist())
        logits = np.asarray(llm.scores[prompt.shape[1] - 1], dtype=np.float64)
        llm.close()
        row[outtype] = {
            "file_mib": path.stat().st_size / 2**20,
            "ppl": ppl,
            "ppl_rel_diff": ppl / hf_ppl - 1,
            "prompt_logits_rel_err": float(np.abs(logits - hf_logits).max() / np.abs(hf_logits).max()),
            "same_next_token": int(np.argmax(logits)) == int(np.argmax(hf_logits)),
            "path": str(path),
        }
        print(json.dumps({name: {outtype: row[outtype]}}), flush=True)
    return row


def without_extra_buffers(defaults):
    """``defaults`` (llama-cpp-python's ``llama_model_default_params``) with llama.cpp's extra CPU buffer
    types (AMX, repacked weights) turned off, as llama.cpp's own ``--no-repack`` does: on CPUs with AMX,
    llama-cpp-python 0.3.36 segfaults in decode on quantized files otherwise (README). The export tests
    load models this way too."""

    def params():
        loaded = defaults()
        if hasattr(loaded, "use_extra_bufts"):  # older bindings have no such field
            loaded.use_extra_bufts = False
        return loaded

    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a pruned model directory")
    parser.add_argument("--dense", default=None, help="its dense source (default: recorded in the plan)")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--outtypes", default="f32,f16,q8_0")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--no-repack",
        action="store_true",
        help="plain CPU weight buffers (needed where AMX makes llama.cpp crash on quantized files)",
    )
    args = parser.parse_args()
    if args.no_repack:  # every later model loads with plain CPU buffers; speeds measure those kernels
        bindings = llama_cpp.llama.llama_cpp
        bindings.llama_model_default_params = without_extra_buffers(bindings.llama_model_default_params)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    dense = args.dense or dense_source_of(args.model)
    rows = [check("dense", dense, args), check("pruned", args.model, args)]
    for outtype in args.outtypes.split(","):
        timed = speeds({row["model"]: Path(row[outtype]["path"]) for row in rows}, args)
        for row in rows:
            row[outtype] |= timed[row["model"]]
    (args.out_dir / "llamacpp_check.json").write_text(json.dumps(rows, indent=2) + "\n")
    for outtype in args.outtypes.split(","):
        d, p = rows[0][outtype], rows[1][outtype]
        print(
            f"{outtype}: ppl dense {d['ppl']:.3f} (HF {rows[0]['hf_ppl']:.3f}) pruned {p['ppl']:.3f} "
            f"(HF {rows[1]['hf_ppl']:.3f}); decode {d['decode_tok_s']:.1f} -> {p['decode_tok_s']:.1f} tok/s "
            f"(x{p['decode_tok_s'] / d['decode_tok_s']:.2f}); prefill {d['prefill_tok_s']:.0f} -> "
            f"{p['prefill_tok_s']:.0f} tok/s (x{p['prefill_tok_s'] / d['prefill_tok_s']:.2f})"
        )


if __name__ == "__main__":
    main()
