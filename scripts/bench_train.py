"""Benchmark of training steps per budget, with token-capped batches, beside training at a fixed 1120.

    python scripts/bench_train.py [--recipe recipes/tiny.yaml] [--steps 6] [key=value ...]

Each configuration runs in a fresh process (so its peak memory is its own): one per budget with the
recipe's token cap (a batch at 1120 holds ~1/16 of the images of one at 70), and the schedule's mix of
budgets. Prints, per configuration: images per batch, step time, images/s, visual tokens/s and peak
memory (CUDA: allocator peak; CPU: resident set). Batches are prepared before timing: this measures the
model, not the data pipeline (scripts/bench_data.py measures that).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(recipe_path: str, overrides: list[str], levels: list[int], steps: int) -> dict:
    """Train ``steps`` steps (after one warm-up) with budgets drawn from ``levels``; returns the figures."""
    import torch

    from vlmtrain.config import load_recipe
    from vlmtrain.model.build import build_model, set_trainable
    from vlmtrain.plan import plan_run
    from vlmtrain.train.run import build_datamodule

    recipe = load_recipe(recipe_path, [*overrides, f"budget.levels={levels}", "budget.default=null", "budget.weights=null"])
    plan = plan_run(recipe)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(plan.model, plan.tokenizer, recipe.seed)
    set_trainable(model, recipe.optim)
    model = model.to(device).train()
    stream = build_datamodule(plan).train_dataloader().dataset
    batches = [step.batches[0] for step in islice(stream.steps(0, 1, 0), steps + 1)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    images = tokens = 0
    elapsed = 0.0
    for index, batch in enumerate(batches):
        inputs = _to(batch.inputs, device)
        began = time.perf_counter()
        with autocast:
            loss = model.sample_losses(inputs).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index:  # the first step warms up
            elapsed += time.perf_counter() - began
            images += inputs.images.count
            tokens += int(inputs.images.token_counts.sum())
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "levels": levels,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "images_per_batch": images / steps,
        "step_s": elapsed / steps,
        "images_per_s": images / elapsed,
        "visual_tokens_per_s": tokens / elapsed,
        "peak_memory_gb": peak / 2**30,
        "schedule": plan.schedule.levels,
    }


def _to(batch, device):
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(batch, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny.yaml"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one configuration in this process
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.recipe, args.overrides, json.loads(args.one), args.steps)))
        return
    from vlmtrain.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    configurations = [[level] for level in recipe.budget.levels] + [list(recipe.budget.levels)]
    print(
        f"recipe {args.recipe} {' '.join(args.overrides)}: batch_tokens {recipe.data.batching.batch_tokens}, "
        f"{args.steps} timed steps each"
    )
    print(
        f"{'configuration':>22} {'images/batch':>13} {'step s':>8} {'images/s':>9} {'vis. tokens/s':>14} {'peak memory GB':>15}"
    )
    rows = []
    for levels in configurations:
        command = [
            sys.executable,
            __file__,
            "--recipe",
            args.recipe,
            "--steps",
            str(args.steps),
            "--one",
            json.dumps(levels),
            *args.overrides,
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append(row)
        name = f"budget {levels[0]}" if len(levels) == 1 else "mixed (schedule)"
        if levels == [1120]:
            name = "budget 1120 = fixed"
        print(
            f"{name:>22} {row['images_per_batch']:>13.1f} {row['step_s']:>8.3f} {row['images_per_s']:>9.1f} "
            f"{row['visual_tokens_per_s']:>14.0f} {row['peak_memory_gb']:>15.2f}",
            flush=True,
        )
    fixed = next(row for row in rows if row["levels"] == [1120])
    mixed = rows[-1]
    print(
        f"mixed-budget training runs {mixed['images_per_s'] / fixed['images_per_s']:.1f}x the images/s "
        "of training at a fixed 1120 budget"
    )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
