#!/usr/bin/env bash
# Set up .venv with the test tools and run the test suite (CPU only; GPU tests skip themselves).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
. .venv/bin/activate
python -m pytest -q "$@"
