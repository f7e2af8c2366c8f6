#!/usr/bin/env bash
# Launch a recipe with torchrun on this node's GPUs; for several nodes, run the same command on each node.
# Devices and nodes reach the recipe from torchrun's environment (trainer.devices / num_nodes: auto);
# resume=auto makes a restarted launch continue from the run's latest checkpoint.
#   bash scripts/launch.sh recipes/gemma4-qwen3-14b-lora-zero3.yaml                          # one node, all GPUs
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 bash scripts/launch.sh RECIPE [key=value ...]     # on node i of 4
set -euo pipefail
cd "$(dirname "$0")/.."
recipe=$1
shift
gpus=${GPUS:-$(.venv/bin/python -c "import torch; print(max(1, torch.cuda.device_count()))")}
exec .venv/bin/torchrun --nnodes="${NNODES:-1}" --node-rank="${NODE_RANK:-0}" --nproc-per-node="$gpus" \
    --master-addr="${MASTER_ADDR:-127.0.0.1}" --master-port="${MASTER_PORT:-29500}" \
    -m vlmtrain.cli fit "$recipe" resume=auto "$@"
