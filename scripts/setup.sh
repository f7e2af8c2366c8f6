#!/usr/bin/env bash
# Create .venv and install vlmtrain into it (editable). Torch goes first: an installed torch is kept
# (e.g. your CUDA build); otherwise torch==$TORCH_VERSION (2.13.0: a CPU wheel on our machines). The rest
# is installed under a constraint pinning that torch, so no second, multi-GB torch gets pulled in.
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
python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraints"
pip install -q -c "$constraints" -e ".$extras"
echo "vlmtrain installed in .venv (torch $(python -c 'import torch; print(torch.__version__)'))"
