"""Benchmark of packed against padded steps on a realistic text mix, per budget and for the mixed schedule.

    python scripts/bench_packing.py [--steps 6] [--samples 600] [--out /tmp/vlmtrain-bench-packing] [key=value ...]

The mix (written once as shards under OUT): captions of 10-40 tokens, question-answer pairs of 30-200,
multi-turn conversations of 200-800, a tenth text-only, a tenth with two images; images are crops of the
shipped photos at many sizes and aspect ratios. The model is recipes/tiny.yaml's (its ViT from random
weights), trained with the recipe's token cap. Each configuration runs in a fresh process (its peak memory
is its own), after one warm-up step, with the same steps' data prepared before timing.

Prints, per configuration and mode (packed: data.batching.packing true; padded: false, one aspect bucket per
step, text padded to the longest sample): padding of LM positions, fill of the token cap, the padded text
tensor relative to the cap, real (non-padding) tokens per second and peak memory; then the packed/padded
ratio of real tokens per second. The encoder pads nothing in either mode (its blocks attend over the packed
sequence, its conv stem runs per patch grid); the column "ZeRO-3 stem padding" is what the conv stem's
canvases would pad under ZeRO-3 with several processes, where it runs once per budget-level bin.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = (
    "the a cat dog sun moon tree fish bird leaf red blue small large photo picture shows with near under over on of and".split()
)


def sentence(rng: random.Random, tokens: int) -> str:
    """About ``tokens`` byte-tokenizer tokens of words."""
    words, length = [], 0
    while length < tokens:
        word = rng.choice(WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:tokens]


def build_mix(out: Path, count: int, seed: int = 0) -> str:
    """Write the mix's images and shards under ``out`` (once); returns the shard spec."""
    from PIL import Image

    from vlmtrain.data.annotations import read_annotations
    from vlmtrain.data.demo import PHOTOS, demo_photo
    from vlmtrain.data.shards import write_shards

    if (out / "mix-index.json").is_file():
        shards = sorted(out.glob("mix-*.tar"))
        return f"{out}/mix-{{000000..{len(shards) - 1:06d}}}.tar"
    rng = random.Random(seed)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        kind = rng.choices(("caption", "qa", "chat"), weights=(4, 4, 2))[0]
        images = 0 if rng.random() < 0.1 else (2 if rng.random() < 0.11 else 1)
        names = []
        for position in range(images):
            photo = demo_photo(rng.choice(PHOTOS))
            aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
            long_side = int(math.exp(rng.uniform(math.log(200), math.log(1600))))
            width, height = (
                (long_side, max(16, int(long_side / aspect))) if aspect > 1 else (max(16, int(long_side * aspect)), long_side)
            )
            name = f"{index:05d}-{position}.jpg"
            photo.resize((width, height), Image.Resampling.BILINEAR).save(image_dir / name, quality=85)
            names.append(name)
        markers = "<image>" * images
        if kind == "caption":
            record = {"images": names, "prompt": f"{markers}Caption:", "text": sentence(rng, rng.randint(10, 40))}
        elif kind == "qa":
            record = {
                "images": names,
                "prompt": f"{markers}Q: {sentence(rng, rng.randint(10, 60))}\nA:",
                "text": sentence(rng, rng.randint(20, 140)),
            }
        else:
            turns, budget = [], rng.randint(200, 800)
            while budget > 0:
                question, answer = rng.randint(20, 80), rng.randint(40, 200)
                turns += [
                    {"role": "user", "content": sentence(rng, question)},
                    {"role": "assistant", "content": sentence(rng, answer)},
                ]
                budget -= question + answer + 20
            turns[0]["content"] = markers + turns[0]["content"]
            record = {"images": names, "messages": turns}
        lines.append(json.dumps({"key": f"m{index:05d}", **record}))
    (out / "mix.jsonl").write_text("\n".join(lines) + "\n")
    write_shards(read_annotations(out / "mix.jsonl").records, image_dir, out, "mix", samples_per_shard=100)
    return build_mix(out, count, seed)


MIX_TEXT = ["data.text.prompt_field=prompt", "data.text.max_length=1024"]  # how the mix's records read


def measure(spec: str, overrides: list[str], levels: list[int], steps: int, packing: bool) -> dict:
    """Train ``steps`` steps (after one warm-up) at ``levels`` in one packing mode; returns the figures."""
    import torch

    from vlmtrain.config import load_recipe
    from vlmtrain.families import build_model
    from vlmtrain.plan import plan_run
    from vlmtrain.train.optim import set_trainable
    from vlmtrain.train.run import build_datamodule

    recipe = load_recipe(
        ROOT / "recipes" / "tiny.yaml",
        [
            "model.vision.path=null",
            f"data.train={spec}",
            "data.val=null",
            *MIX_TEXT,
            "data.batching.batch_tokens=4096",
            "data.batching.max_batch_size=64",
            f"data.batching.packing={packing}",
            f"budget.levels={levels}",
            "budget.weights=null",
            *overrides,
        ],
    )
    plan = plan_run(recipe)
    model = build_model(plan.model, plan.start, plan.tokenizer, recipe.seed)
    set_trainable(model, recipe.optim)
    model.train()
    stream = build_datamodule(plan).train_dataloader().dataset
    batches = [step.batches[0] for step in islice(stream.steps(0, 1, 0), steps + 1)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cap = recipe.data.batching.batch_tokens
    figures = {"tokens": 0, "positions": 0, "patches": 0, "patch_slots": 0, "samples": 0, "seconds": 0.0}
    figures |= {"fill": [], "tensor": []}
    for index, batch in enumerate(batches):
        began = time.perf_counter()
        model.sample_losses(batch.inputs).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index == 0:
            continue  # the warm-up
        figures["seconds"] += time.perf_counter() - began
        figures["tokens"] += batch.tokens
        figures["samples"] += len(batch.keys)
        figures["positions"] += batch.inputs.input_ids.numel()
        figures["fill"].append(batch.tokens / cap)
        figures["tensor"].append(batch.inputs.input_ids.numel() / cap)
        patches, slots = stem_canvases(batch.inputs.images.patch_grids.tolist(), model.backbone.bins)
        figures["patches"] += patches
        figures["patch_slots"] += slots
    return {
        "levels": levels,
        "packing": packing,
        "lm_padding": 1 - figures["tokens"] / figures["positions"],
        "zero3_stem_padding": 1 - figures["patches"] / max(figures["patch_slots"], 1),
        "fill": sum(figures["fill"]) / steps,
        "fill_min": min(figures["fill"]),
        "tensor_max": max(figures["tensor"]),
        "tokens_per_s": figures["tokens"] / figures["seconds"],
        "samples_per_step": figures["samples"] / steps,
        "peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def stem_canvases(grids: list[list[int]], bins: tuple[int, ...]) -> tuple[int, int]:
    """(patches, canvas patches) of the conv stem when it runs per bin and aspect class (several ZeRO-3
    processes): each image of a group on a canvas of the group's most rows x most columns. (One process runs
    it per grid: no padding.)"""
    from vlmtrain.modeling.backbone import STEM_ASPECT_CLASSES, bin_members

    members = bin_members([tuple(grid) for grid in grids], bins, STEM_ASPECT_CLASSES)
    canvas = sum(
        len(group) * max(grids[i][0] for i in group) * max(grids[i][1] for i in group) for group in members if group
    )
    return sum(rows * cols for rows, cols in grids), canvas


COLUMNS = [  # title, width, figure, format
    ("LM padding", 11, "lm_padding", ".1%"),
    ("ZeRO-3 stem padding", 20, "zero3_stem_padding", ".1%"),
    ("fill", 6, "fill", ".1%"),
    ("min fill", 9, "fill_min", ".1%"),
    ("tensor/cap", 11, "tensor_max", ".2f"),
    ("real tokens/s", 14, "tokens_per_s", ",.0f"),
    ("peak GB", 8, "peak_memory_gb", ".2f"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--out", type=Path, default=Path("/tmp/vlmtrain-bench-packing"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one configuration in this process
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    spec = build_mix(args.out, args.samples)
    if args.one:
        levels, packing = json.loads(args.one)
        print(json.dumps(measure(spec, args.overrides, levels, args.steps, packing)))
        return
    print(f"{args.samples} samples (captions, QA, multi-turn; 10% text-only, 10% two images), token cap 4096")
    print(f"{args.steps} timed steps per configuration")
    print(f"{'configuration':>18} {'mode':>7} " + " ".join(f"{title:>{width}}" for title, width, *_ in COLUMNS))
    rows = []
    for levels in [[70], [140], [280], [560], [1120], [70, 140, 280, 560, 1120]]:
        pair = {}
        for packing in (True, False):
            command = [
                sys.executable,
                __file__,
                "--steps",
                str(args.steps),
                "--samples",
                str(args.samples),
                "--out",
                str(args.out),
                "--one",
                json.dumps([levels, packing]),
                *args.overrides,
            ]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            row = json.loads(result.stdout.strip().splitlines()[-1])
            pair[packing] = row
            rows.append(row)
            name = f"budget {levels[0]}" if len(levels) == 1 else "mixed (schedule)"
            mode = "packed" if packing else "padded"
            cells = " ".join(f"{row[key]:>{width}{form}}" for _, width, key, form in COLUMNS)
            print(f"{name:>18} {mode:>7} {cells}", flush=True)
        print(
            f"{'':>18} packed/padded real tokens/s: {pair[True]['tokens_per_s'] / pair[False]['tokens_per_s']:.2f}x", flush=True
        )
    (args.out / "bench_packing.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
