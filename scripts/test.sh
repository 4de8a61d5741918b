#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite offline, slow tests included (CI runs this).
# Extra arguments go to pytest: locally, `bash scripts/test.sh -m "not slow"` runs the fast subset
# (tests marked slow use a real embedded model or take more than ~5 s on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
# the tests check every embedded model's files, and exported GGUF files in llama.cpp
MODELS=${MODELS:-all} LLAMACPP=${LLAMACPP:-1} bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
