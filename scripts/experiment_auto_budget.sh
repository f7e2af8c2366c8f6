#!/usr/bin/env bash
# The automatic budget on a mixed workload (issue 16; docs/experiment-auto-budget.md): the demo's images, each
# asked two questions, "which word is written?" (small words need 1120 tokens, large ones 70) and "which photo
# is it?" (70 suffices). One mixed-budget model is trained on both, labels its own training data at every
# level, a selector learns from the labels, and eval compares auto with the five fixed budgets on the
# validation images (never labelled). About 25 minutes on 2 CPU cores. Extra arguments: recipe overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
out=${OUT:-runs/auto-budget}
mkdir -p "$out"
vlmtrain demo-data --out data/generated/demo
python - "$out" <<'PY'
import json, sys
from pathlib import Path
from vlmtrain.data.sources import expand_shards, read_shard
out = Path(sys.argv[1])
questions = {"word": ("<image> Which word is written on the image? ", "text"), "photo": ("<image> What is the photo? ", "photo")}
for split, spec in (("train", "train-{000000..000015}"), ("val", "val-000000")):
    with (out / f"{split}.jsonl").open("w") as file:
        for url in expand_shards(f"data/generated/demo/{spec}.tar"):
            for sample in read_shard(url):
                for task, (question, field) in questions.items():
                    record = {"key": f"{sample.key}-{task}", "images": [f"{sample.key}.jpg"], "question": question,
                              "answer": sample.record[field], "task": task, "size": sample.record["size"]}
                    file.write(json.dumps(record) + "\n")
PY
for split in train val; do
    [ -d "$out/shards-$split" ] || vlmtrain shards "$out/$split.jsonl" "$out/shards-$split" --images data/generated/demo/images \
        --prefix "$split" --samples-per-shard 256
done
[ -d "$out/run" ] || vlmtrain fit recipes/tiny.yaml run_dir="$out/run" logger=csv \
    "data.train=$out/shards-train/train-{000000..000015}.tar" "data.val=$out/shards-val/val-000000.tar" data.val_samples=128 \
    data.text.prompt_field=question data.text.target_field=answer data.text.group_field=task trainer.max_steps=400 "$@"
[ -d "$out/export" ] || vlmtrain export "$out/run" "$out/export"
vlmtrain label-budgets "$out/export" --data "$out/shards-train/train-{000000..000015}.tar" --limit 1024 --out "$out/labels"
vlmtrain train-selector "$out/export" --labels "$out/labels"
vlmtrain eval "$out/export" --data "$out/shards-val/val-000000.tar" --limit 128 --max-new-tokens 4 \
    --budgets 70,140,280,560,1120,auto:0.01,auto:0.05,auto:0.2,auto:0.5 --out "$out/eval"
