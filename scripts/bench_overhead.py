"""What vlmtrain's training loop costs beyond the model: one training step of the tiny recipe under Lightning with
every vlmtrain callback (checks, metrics, progress lines, CSV logs, checkpoint bookkeeping) against a bare
PyTorch loop over the same model, the same prepared packed steps, the same optimizer and schedule. Each in a
process of its own; the time from the start of the first timed step to the start of the last, per step.

    python scripts/bench_overhead.py [--steps 40] [--warmup 5] [key=value ...]   # overrides of recipes/tiny.yaml
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepared(overrides: list[str], total: int, run_dir: Path):
    """(recipe, plan, the first ``total`` steps of its data stream), built before anything is timed."""
    from vlmtrain.config import load_recipe
    from vlmtrain.plan import plan_run
    from vlmtrain.train.run import build_datamodule

    settings = [f"run_dir={run_dir}", "logger=csv", "data.val=null", "data.num_workers=0", f"trainer.max_steps={total}",
                f"trainer.checkpoint_every={10 * total}", *overrides]
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", settings)
    plan = plan_run(recipe)
    stream = build_datamodule(plan).train_dataloader().dataset
    return recipe, plan, list(islice(stream.steps(0, 1, 0), total))


def bare(overrides: list[str], steps: int, warmup: int, run_dir: Path) -> float:
    """Seconds per step of a plain loop: the module's loss, backward, clipping, optimizer and schedule steps."""
    import torch

    from vlmtrain.train.module import VLMModule

    recipe, plan, batches = prepared(overrides, warmup + steps + 1, run_dir)
    module = VLMModule(plan)
    module.configure_model()
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    starts = []
    for step in batches:
        starts.append(time.perf_counter())
        loss = torch.stack([module.model.sample_losses(batch.inputs).mean() for batch in step.batches]).mean()
        loss.backward()
        if recipe.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(module.model.parameters(), recipe.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return (starts[-1] - starts[warmup]) / steps


def lightning(overrides: list[str], steps: int, warmup: int, run_dir: Path) -> float:
    """Seconds per step of ``vlmtrain fit``'s Trainer (every callback, CSV logging) on the same steps."""
    import lightning as L
    from torch.utils.data import DataLoader

    from vlmtrain.train.module import VLMModule
    from vlmtrain.train.run import build_trainer, prepare_run_dir

    recipe, plan, batches = prepared(overrides, warmup + steps + 1, run_dir)
    starts: list[float] = []

    class StepClock(L.Callback):
        def on_train_batch_start(self, *args) -> None:
            starts.append(time.perf_counter())

    trainer = build_trainer(recipe, prepare_run_dir(recipe), [StepClock()])
    loader = DataLoader(batches, batch_size=None, collate_fn=lambda step: step)
    trainer.fit(VLMModule(plan), train_dataloaders=loader)
    return (starts[-1] - starts[warmup]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--variant", choices=("bare", "lightning"), help=argparse.SUPPRESS)  # the child processes
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.variant:
        with tempfile.TemporaryDirectory() as folder:
            measure = bare if args.variant == "bare" else lightning
            print(json.dumps({"step_s": measure(args.overrides, args.steps, args.warmup, Path(folder) / "run")}))
        return
    seconds = {}
    for variant in ("bare", "lightning"):
        command = [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   *args.overrides]
        out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
        seconds[variant] = json.loads(out.stdout.strip().splitlines()[-1])["step_s"]
    print(f"recipes/tiny.yaml {' '.join(args.overrides)}: {args.steps} steps after {args.warmup} warm-up, one process each")
    print(f"bare PyTorch loop     {seconds['bare'] * 1000:8.1f} ms/step")
    print(f"vlmtrain (Lightning)  {seconds['lightning'] * 1000:8.1f} ms/step")
    print(f"overhead: {seconds['lightning'] / seconds['bare']:.3f}x (goal <= 1.05x)")


if __name__ == "__main__":
    main()
