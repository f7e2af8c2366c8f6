#!/usr/bin/env bash
# The GPU checks in one run (issue 19), under 8 minutes on one H200: what the machine has, the tests marked
# gpu, and scripts/bench_train.py on a real-size model built from configs (recipes/bench-so400m-llama-1b.yaml:
# SigLIP2-so400m-shaped tower, Llama-1B-shaped LM with LoRA, random weights, bf16 autocast) on the
# caption/QA/multi-turn mix: step time, visual and text tokens/s, peak memory and MFU per budget and mixed.
# Figures go to $OUT (default /tmp/vlmtrain-gpu-check): env.txt, gpu-tests.txt, bench_train.txt/.json.
#
#   bash scripts/gpu_wheels.sh          # here, once: the packages the GPU machine lacks, as wheels in .whl/
#   bash scripts/gpu_check.sh           # there (the device tool carries .whl)
#   bash scripts/gpu_check.sh --cpu-dry-run   # here: the same steps at tiny sizes on the CPU (in the test suite)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/vlmtrain-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

if [ "${1:-}" = "--cpu-dry-run" ]; then
    python=${PYTHON:-.venv/bin/python}
    tests=(tests/test_gpu.py -m gpu)      # collected and skipped without CUDA: the markers and imports hold
    bench=(--steps 1 --mix 40 --peak-tflops 1 data.batching.batch_tokens=2304 data.batching.max_batch_size=16
           'model.vision.hf_config={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_patches: 256, patch_size: 16}'
           model.lm.hf_config.hidden_size=32 model.lm.hf_config.intermediate_size=64 model.lm.hf_config.num_hidden_layers=1
           model.lm.hf_config.num_attention_heads=2 model.lm.hf_config.num_key_value_heads=1 model.lm.hf_config.vocab_size=512)
    limits=(60 300)
else
    python=${PYTHON:-python3}
    if ls .whl/*.whl >/dev/null 2>&1; then   # the packages the machine lacks (scripts/gpu_wheels.sh)
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
    if ls .whl/deepspeed-*.tar.gz >/dev/null 2>&1 && ! PYTHONPATH=$PYTHONPATH "$python" -c "import deepspeed" 2>/dev/null; then
        DS_BUILD_OPS=0 "$python" -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/deepspeed-*.tar.gz \
            || echo "deepspeed did not install: the ZeRO-3 test will fail" >&2
    fi
    tests=(tests/test_gpu.py -m gpu -s)
    bench=(--steps 4 --mix 600)
    limits=(180 330)
fi

{
    date -u
    git log -1 --format='commit %H %s' 2>/dev/null
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$python" - <<'EOF'
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for name in ("transformers", "lightning", "peft", "deepspeed", "webdataset", "omegaconf"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # a missing package is reported, the checks go on
        print(name, "missing:", type(error).__name__, error)
EOF
} 2>&1 | tee "$OUT/env.txt"

echo "== tests marked gpu"
timeout "${limits[0]}" "$python" -m pytest -q -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$OUT/gpu-tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== real-size benchmark"
timeout "${limits[1]}" "$python" scripts/bench_train.py --recipe recipes/bench-so400m-llama-1b.yaml --out "$OUT" "${bench[@]}" 2>&1 \
    | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
