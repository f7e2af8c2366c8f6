"""Benchmark of training steps per budget, with token-capped batches, beside training at a fixed 1120.

    python scripts/bench_train.py [--recipe recipes/tiny.yaml] [--steps 6] [--mix N] [--out DIR]
                                  [--peak-tflops T] [key=value ...]

Each configuration runs in a fresh process (so its peak memory is its own): one per budget with the
recipe's token cap (a batch at 1120 holds ~1/16 of the images of one at 70), and the schedule's mix of
budgets. Prints, per configuration: images per batch, step time, images/s, visual and text tokens/s, peak
memory (CUDA: allocator peak; CPU: resident set), model FLOPs per step and MFU. Batches are prepared
before timing: this measures the model, not the data pipeline (scripts/bench_data.py measures that).
On CUDA steps run under bf16 autocast, with the recipe's precision otherwise ignored.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over the timed steps' forward and
backward passes, run again after timing: every matrix product and attention kernel as executed (frozen
weights get no weight gradient, so LoRA steps count ~2/3 of a full step's FLOPs in the LM; causal
attention is counted in full, as SDPA computes it without a mask hint; the optimizer step is not
counted). MFU = FLOPs per step ÷ step time ÷ ``--peak-tflops`` (default: 790, an H200's dense bf16,
on CUDA; none on CPU). ``--mix N`` trains on scripts/bench_packing.py's caption/QA/multi-turn mix of N
samples instead of the recipe's data.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(recipe_path: str, overrides: list[str], levels: list[int], steps: int, peak_tflops: float | None) -> dict:
    """Train ``steps`` steps (after one warm-up) with budgets drawn from ``levels``; returns the figures."""
    import torch

    from vlmtrain.config import load_recipe
    from vlmtrain.families import build_model
    from vlmtrain.plan import plan_run
    from vlmtrain.train.optim import set_trainable
    from vlmtrain.train.run import build_datamodule

    recipe = load_recipe(recipe_path, [*overrides, f"budget.levels={levels}", "budget.default=null", "budget.weights=null"])
    plan = plan_run(recipe)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with device:  # weights made where they train (a real-size model initialises in seconds on a GPU)
        model = build_model(plan.model, plan.start, plan.tokenizer, recipe.seed)
    set_trainable(model, recipe.optim)
    model = model.to(device).train()
    stream = build_datamodule(plan).train_dataloader().dataset
    batches = [step.batches[0] for step in islice(stream.steps(0, 1, 0), steps + 1)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    images = tokens = text = 0
    elapsed = 0.0
    inputs = [_to(batch.inputs, device) for batch in batches]

    def forward_backward(step_inputs) -> None:
        with autocast:
            loss = model.sample_losses(step_inputs).mean()
        loss.backward()

    for index, (batch, step_inputs) in enumerate(zip(batches, inputs, strict=True)):
        began = time.perf_counter()
        forward_backward(step_inputs)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index:  # the first step warms up
            elapsed += time.perf_counter() - began
            images += batch.inputs.images.count
            tokens += batch.visual_tokens
            text += batch.tokens - batch.visual_tokens
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    flops = count_flops(forward_backward, inputs[1:]) / steps
    return {
        "levels": levels,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "images_per_batch": images / steps,
        "step_s": elapsed / steps,
        "images_per_s": images / elapsed,
        "visual_tokens_per_s": tokens / elapsed,
        "text_tokens_per_s": text / elapsed,
        "peak_memory_gb": peak / 2**30,
        "tflops_per_step": flops / 1e12,
        "mfu": flops / (elapsed / steps) / (peak_tflops * 1e12) if peak_tflops else None,
        "schedule": plan.schedule.levels,
    }


def count_flops(forward_backward, inputs: list) -> float:
    """FLOPs of the forward and backward passes over ``inputs``, attention included: the varlen kernel,
    which the counter does not know, gives way to SDPA per sequence length (the same arithmetic)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vlmtrain.modeling import attention

    varlen, attention.varlen_available = attention.varlen_available, lambda: False
    try:
        with FlopCounterMode(display=False) as counter:
            for step_inputs in inputs:
                forward_backward(step_inputs)
    finally:
        attention.varlen_available = varlen
    return float(counter.get_total_flops())


def _to(batch, device):
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(batch, device)


COLUMNS = [  # title, width, figure, format
    ("images/batch", 13, "images_per_batch", ".1f"),
    ("step s", 8, "step_s", ".3f"),
    ("images/s", 9, "images_per_s", ".1f"),
    ("vis. tokens/s", 14, "visual_tokens_per_s", ",.0f"),
    ("text tokens/s", 14, "text_tokens_per_s", ",.0f"),
    ("peak memory GB", 15, "peak_memory_gb", ".2f"),
    ("TFLOP/step", 11, "tflops_per_step", ".3f"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny.yaml"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--mix", type=int, default=0, help="train on bench_packing's mix of this many samples")
    parser.add_argument("--out", type=Path, help="also write the table and the figures (JSON) here")
    parser.add_argument("--peak-tflops", type=float, help="the chip's dense bf16 peak (default: 790 on CUDA)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one configuration in this process
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.recipe, args.overrides, json.loads(args.one), args.steps, args.peak_tflops)))
        return
    import torch

    from vlmtrain.config import load_recipe

    if args.peak_tflops is None and torch.cuda.is_available():
        args.peak_tflops = 790.0
    overrides = list(args.overrides)
    if args.mix:
        from bench_packing import MIX_TEXT, build_mix

        spec = build_mix(Path(tempfile.gettempdir()) / f"vlmtrain-bench-mix-{args.mix}", args.mix)
        overrides = [f"data.train={spec}", "data.val=null", *MIX_TEXT, *overrides]
    recipe = load_recipe(args.recipe, overrides)
    configurations = [[level] for level in recipe.budget.levels] + [list(recipe.budget.levels)]
    lines = [f"recipe {args.recipe}: batch_tokens {recipe.data.batching.batch_tokens}, {args.steps} timed steps each"]
    lines.append(f"{'configuration':>22} " + " ".join(f"{title:>{width}}" for title, width, *_ in COLUMNS) + f" {'MFU':>6}")
    print("\n".join(lines), flush=True)
    rows = []
    for levels in configurations:
        command = [sys.executable, __file__, "--recipe", args.recipe, "--steps", str(args.steps), "--one", json.dumps(levels)]
        if args.peak_tflops:
            command += ["--peak-tflops", str(args.peak_tflops)]
        result = subprocess.run([*command, *overrides], capture_output=True, text=True)
        if result.returncode:
            sys.exit(f"configuration {levels} failed:\n{result.stderr[-3000:]}")
        row = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append(row)
        name = f"budget {levels[0]}" if len(levels) == 1 else "mixed (schedule)"
        mfu = f"{row['mfu']:>6.1%}" if row["mfu"] is not None else f"{'-':>6}"
        lines.append(f"{name:>22} " + " ".join(f"{row[key]:>{width}{form}}" for _, width, key, form in COLUMNS) + f" {mfu}")
        print(lines[-1], flush=True)
    summary = goals(rows)
    lines += summary
    print("\n".join(summary))
    print(json.dumps(rows))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_train.txt").write_text("\n".join(lines) + "\n")
        (args.out / "bench_train.json").write_text(json.dumps(rows, indent=1))


def goals(rows: list[dict]) -> list[str]:
    """The figures the GPU issue reports against: images/s of the mix against a fixed 1120, time per visual
    token at the smallest budget against 1120, peak memory across budgets, MFU at 1120."""
    by_levels = {tuple(row["levels"]): row for row in rows}
    fixed, mixed, smallest = by_levels.get((1120,)), rows[-1], rows[0]
    lines = []
    if fixed:
        speedup = mixed["images_per_s"] / fixed["images_per_s"]
        lines.append(f"mixed-budget training runs {speedup:.1f}x the images/s of training at a fixed 1120 budget")
        per_token = (1 / smallest["visual_tokens_per_s"]) / (1 / fixed["visual_tokens_per_s"])
        lines.append(f"time per visual token at {smallest['levels'][0]} / at 1120: {per_token:.2f} (goal <= 1.3)")
        if fixed["mfu"] is not None:
            lines.append(f"MFU at 1120: {fixed['mfu']:.1%} (goal >= 40%)")
    memory = [row["peak_memory_gb"] for row in rows]
    lines.append(f"peak memory max/min across configurations: {max(memory) / min(memory):.2f} (goal <= 1.25)")
    return lines


if __name__ == "__main__":
    main()
