#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, render the demo data (words written over real photos)
# into WebDataset shards, and train recipes/tiny.yaml on CPU at all five token budgets; ends with the time
# each phase took. Extra arguments are recipe overrides, e.g.: bash scripts/demo.sh trainer.max_steps=50 logger=csv
set -euo pipefail
cd "$(dirname "$0")/.."
began=$SECONDS
bash scripts/setup.sh
. .venv/bin/activate
setup=$((SECONDS - began))
vlmtrain demo-data --out data/generated/demo   # renders only when missing or stale
data=$((SECONDS - began - setup))
vlmtrain fit recipes/tiny.yaml "$@"
training=$((SECONDS - began - setup - data))
echo "demo took $((SECONDS - began)) s: set-up ${setup} s, demo data ${data} s, training ${training} s"
