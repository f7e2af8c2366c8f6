#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, render the demo data (words written over real photos)
# into WebDataset shards, and train recipes/tiny.yaml on CPU at all five token budgets.
# Extra arguments are recipe overrides, e.g.: bash scripts/demo.sh trainer.max_steps=50 logger=csv
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
vlmtrain demo-data --out data/generated/demo   # renders only when missing or stale
vlmtrain fit recipes/tiny.yaml "$@"
