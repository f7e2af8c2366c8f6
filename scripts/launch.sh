#!/usr/bin/env bash
# Launch a recipe with torchrun on this node's GPUs; for several nodes, run the same command on each node.
# Devices and nodes reach the recipe from torchrun's environment (trainer.devices / num_nodes: auto);
# resume=auto (added unless the arguments give resume=... or overwrite=true) makes a restarted launch
# continue from the run's latest checkpoint. DRY_RUN=1 prints the command instead of running it.
#   bash scripts/launch.sh recipes/gemma4-qwen3-14b-lora-zero3.yaml                          # one node, all GPUs
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 bash scripts/launch.sh RECIPE [key=value ...]     # on node i of 4
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/resume-args.sh
[ $# -ge 1 ] || { echo "usage: [NNODES=N NODE_RANK=i MASTER_ADDR=host] bash scripts/launch.sh RECIPE [key=value ...]" >&2; exit 2; }
recipe=$1
shift
nnodes=${NNODES:-1}
if [ "$nnodes" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
    echo "error: NNODES=$nnodes needs MASTER_ADDR (the host of node rank 0), the same on every node" >&2
    exit 2
fi
gpus=${GPUS:-$(.venv/bin/python -c "import torch; print(max(1, torch.cuda.device_count()))")}
mapfile -t args < <(fit_args "$@")
command=(.venv/bin/torchrun --nnodes="$nnodes" --node-rank="${NODE_RANK:-0}" --nproc-per-node="$gpus"
         --master-addr="${MASTER_ADDR:-127.0.0.1}" --master-port="${MASTER_PORT:-29500}"
         -m vlmtrain.cli fit "$recipe" "${args[@]}")
if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "${command[@]}"; echo
    exit 0
fi
exec "${command[@]}"
