#!/usr/bin/env bash
# Here, before a GPU run: the packages the GPU machine's image lacks (or holds at other versions), as wheels
# in .whl/ (ignored by git, carried by the device tool), at the versions of this .venv: transformers, peft,
# omegaconf, webdataset, bitsandbytes (QLoRA's test), DeepSpeed (its source: gpu_check.sh builds it there without
# ops) and their needs.
# The image's own torch, lightning, accelerate and numpy are used as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
platform=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform any)
for name in transformers peft omegaconf webdataset bitsandbytes braceexpand hjson pydantic pydantic_core annotated_types \
        typing_inspection; do
    python3 -m pip download -q --no-deps --only-binary=:all: "${platform[@]}" -d .whl "$name==$(version "$name")"
done
python3 -m pip download -q --no-deps --no-binary=:all: -d .whl "deepspeed==$(version deepspeed)"
du -sh .whl && ls .whl
