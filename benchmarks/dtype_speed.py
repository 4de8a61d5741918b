"""Is bf16 worth it on this machine? Times the same work in float32 and bfloat16, side by side.

Whether bf16 beats fp32 on a CPU depends on its matrix units (AMX) and PyTorch's kernels; this prints
the answer for the machine it runs on: one MLP-sized and one LM-head-sized matmul, and a full forward
of SmolLM2-135M (or --model) on 2 x 512 tokens, best of a few runs each.

    .venv/bin/python benchmarks/dtype_speed.py [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import time

import torch

from multipruner.models import load_model


def best_seconds(work, repeats: int) -> float:
    work()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def time_dtype(model_name: str, dtype: torch.dtype) -> tuple[float, float, float]:
    acts = torch.randn(1024, 576, dtype=dtype)
    up = torch.randn(576, 1536, dtype=dtype)
    head = torch.randn(49152, 576, dtype=dtype)
    model, _ = load_model(model_name, dtype=str(dtype).removeprefix("torch."))
    ids = torch.randint(0, model.config.vocab_size, (2, 512))
    with torch.no_grad():
        return (
            best_seconds(lambda: acts @ up, 10),
            best_seconds(lambda: acts @ head.T, 5),
            best_seconds(lambda: model(ids), 3),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    seconds = {dtype: time_dtype(args.model, dtype) for dtype in (torch.float32, torch.bfloat16)}
    names = ("matmul 1024x576x1536", "matmul 1024x576x49152", f"forward {args.model} 2x512")
    print(f"{'':26} {'float32':>10} {'bfloat16':>10} {'bf16 speed-up':>14}")
    for k, name in enumerate(names):
        fp32, bf16 = seconds[torch.float32][k], seconds[torch.bfloat16][k]
        print(f"{name:26} {fp32:9.4f}s {bf16:9.4f}s {fp32 / bf16:13.2f}x")


if __name__ == "__main__":
    main()
