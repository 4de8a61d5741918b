#!/usr/bin/env bash
# Lint and format check (CI runs it before the tests): ruff's rules and formatting from pyproject.toml.
# `bash scripts/lint.sh --fix` applies the fixes and the formatting instead of checking.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
if [ "${1:-}" = --fix ]; then
  .venv/bin/ruff check --fix src tests benchmarks examples
  .venv/bin/ruff format src tests benchmarks examples
else
  .venv/bin/ruff check src tests benchmarks examples
  .venv/bin/ruff format --check src tests benchmarks examples
fi
