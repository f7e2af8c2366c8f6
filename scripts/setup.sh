#!/usr/bin/env bash
# Create .venv and install vlmtrain into it (editable). Torch goes first: an installed torch is kept
# (e.g. your CUDA build); otherwise torch==$TORCH_VERSION (2.13.0: a CPU wheel on our machines). The rest
# is installed under a constraint pinning that torch, so no second, multi-GB torch gets pulled in.
# DeepSpeed builds against that torch (no build isolation), with its CPU communication op compiled now
# rather than at the first run (DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1; set DS_BUILD_OPS=1 for all GPU ops).
#   bash scripts/setup.sh          # runtime
#   bash scripts/setup.sh --dev    # + test tools
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || pip install -q "torch==${TORCH_VERSION:-2.13.0}"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
# -W ignore: numpy is not installed yet at this point, and torch warns about that on import
python -W ignore -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraints"
python -c "import deepspeed" 2>/dev/null || {
    pip install -q -c "$constraints" "setuptools>=69" wheel ninja packaging psutil py-cpuinfo
    DS_BUILD_OPS=${DS_BUILD_OPS:-0} DS_BUILD_SHM_COMM=${DS_BUILD_SHM_COMM:-1} \
        pip install -q -c "$constraints" --no-build-isolation "deepspeed>=0.16"
}
pip install -q -c "$constraints" -e ".$extras"
echo "vlmtrain installed in .venv (torch $(python -c 'import torch; print(torch.__version__)'))"
