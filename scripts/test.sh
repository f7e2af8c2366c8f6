#!/usr/bin/env bash
# Set up .venv with the test tools, lint (ruff and import-linter, the rules in pyproject.toml) and run the test
# suite (CPU; tests marked gpu skip themselves without CUDA). Extra arguments go to pytest, e.g. -m "not slow"
# for the one-minute inner loop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
. .venv/bin/activate
ruff check .
lint-imports --no-cache  # the import contracts in pyproject.toml
python -m pytest -q "$@"
