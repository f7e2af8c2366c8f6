"""Callbacks: throughput per budget, and the end-of-run summary of loss per budget."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from vlmtrain.data.batch import Step
from vlmtrain.train.interrupts import StoppedBetweenSteps
from vlmtrain.train.layout import SUMMARY
from vlmtrain.train.module import VLMModule, log_this_step


class StepTimer:
    """Wall-clock time of training steps without a host-device synchronisation per step: on a GPU, CUDA
    events recorded around each step are read only when figures are wanted (every ``log_every`` steps)."""

    def __init__(self) -> None:
        self.pending: list[tuple[object, object, Step]] = []

    def start(self, module: L.LightningModule) -> object:
        if module.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, module: L.LightningModule, began: object, step: Step) -> None:
        self.pending.append((began, self.start(module), step))

    def collect(self) -> list[tuple[float, Step]]:
        """(seconds, step) of the steps timed since the last call."""
        done = []
        for began, ended, step in self.pending:
            if isinstance(began, float):
                done.append((ended - began, step))
            else:
                ended.synchronize()
                done.append((began.elapsed_time(ended) / 1000.0, step))
        self.pending = []
        return done


class BudgetThroughput(L.Callback):
    """Every ``log_every`` steps: per budget, images and visual tokens per second of the training steps at that
    budget, LM tokens per second, and the time spent waiting for data. ``images_per_s`` keeps each budget's
    figures for the run's summary, ``interval`` the last interval's totals for the progress line."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.timer = StepTimer()
        self._began: object | None = None
        self._step_end: float | None = None
        self._wait = 0.0
        self.images_per_s: dict[int, list[float]] = defaultdict(list)
        self.interval: dict[str, float] = {}

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, step: Step, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._step_end is not None:
            self._wait += now - self._step_end
        self._began = self.timer.start(module)

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._step_end = None  # the time validation took is not time spent waiting for data

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, step: Step, batch_idx: int) -> None:
        self.timer.stop(module, self._began, step)
        self._step_end = time.perf_counter()
        if (batch_idx + 1) % self.every == 0 or trainer.global_step >= trainer.max_steps:
            self.report(module)

    def report(self, module: L.LightningModule) -> None:
        """Log the figures of the steps since the last report."""
        timed = self.timer.collect()
        if not timed:
            return
        seconds = sum(duration for duration, _ in timed)
        batches = [batch for _, step in timed for batch in step.batches]
        self.interval = {"steps": len(timed), "seconds": seconds, "wait": self._wait, "tokens": sum(b.tokens for b in batches),
                         "images": sum(b.inputs.images.count for b in batches)}
        values = {"train/tokens_per_s": self.interval["tokens"] / seconds, "train/data_wait_s": self._wait / len(timed)}
        by_budget: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
        for duration, step in timed:
            if len(step.batches) == 1 and step.batches[0].budget is not None:  # a step at one budget: its own figures
                figures = by_budget[step.batches[0].budget]
                figures[0] += duration
                figures[1] += step.batches[0].inputs.images.count
                figures[2] += step.batches[0].visual_tokens
        for budget, (duration, images, visual) in by_budget.items():
            self.images_per_s[budget].append(images / duration)
            values[f"train/images_per_s@{budget}"] = images / duration
            values[f"train/visual_tokens_per_s@{budget}"] = visual / duration
        self._wait = 0.0
        log_this_step(module, values, every=1)


class DataProgress(L.Callback):
    """After each trained step: tell the datamodule where the data stands (for checkpoints) and log the
    step's padding, real tokens, bucket (unpacked), data epoch and size, and the samples this rank skipped so far, by kind and
    in total (the total is on the progress bar)."""

    def __init__(self) -> None:
        self.skipped: dict[int, dict[str, int]] = {}
        self.total_skipped = 0

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, step: Step, batch_idx: int) -> None:
        if trainer.datamodule is not None and hasattr(trainer.datamodule, "record"):
            trainer.datamodule.record(step)
        self.skipped[step.position.stream] = step.position.state.get("skipped", {})
        totals: dict[str, int] = {}
        for counts in self.skipped.values():
            for kind, count in counts.items():
                totals[kind] = totals.get(kind, 0) + count
        first = step.batches[0]
        values = {
            "data/padding": sum(batch.padding for batch in step.batches) / len(step.batches),
            "data/epoch": float(min(first.epochs, default=0)),
            "data/samples": float(first.size),
            "data/images": float(len(first.grids)),
            "data/tokens": float(first.tokens),
            "skipped": float(sum(totals.values())),
            **{f"data/skipped_{kind}": float(count) for kind, count in totals.items()},
        }
        self.total_skipped = int(values["skipped"])
        if first.grids and not first.inputs.packed:  # a step of one aspect bucket
            rows, cols = first.grids[0]
            log_this_step(module, {"data/bucket_aspect": cols / rows})
        for name, value in values.items():
            module.log(name, value, on_step=True, on_epoch=False, prog_bar=name == "skipped", batch_size=1)


class RunSummary(L.Callback):
    """Collects training loss per budget (from each step's output), its speed (from ``throughput``) and each
    validation round; at the end writes ``summary.json`` into the run directory and prints a table: does
    the loss fall at every budget?"""

    def __init__(self, run_dir: Path, throughput: BudgetThroughput) -> None:
        self.run_dir = run_dir
        self.throughput = throughput
        self.train: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.val_rounds: list[dict] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, step: Step, batch_idx: int) -> None:
        for budget, loss in outputs["budget_losses"].items():
            self.train[budget].append(loss)

    def on_validation_end(self, trainer: L.Trainer, module: VLMModule) -> None:
        # after the module's on_validation_epoch_end, which Lightning calls after the callbacks' own
        if not trainer.sanity_checking:
            budgets = {
                budget: {"loss": result.loss, "groups": result.groups} for budget, result in module.last_validation.items()
            }
            self.val_rounds.append({"step": trainer.global_step, "budgets": budgets})

    def summary(self) -> dict:
        """Per budget: steps trained, mean training loss over the first and last quarter of them, median
        training images per second; and every validation round."""
        budgets = {}
        for budget, values in sorted(self.train.items()):
            losses = [float(loss) for loss in values]
            quarter = max(1, len(losses) // 4)
            speeds = sorted(self.throughput.images_per_s.get(budget, []))
            budgets[budget] = {
                "steps": len(losses),
                "train_loss_first_quarter": sum(losses[:quarter]) / quarter,
                "train_loss_last_quarter": sum(losses[-quarter:]) / quarter,
                "images_per_s": speeds[len(speeds) // 2] if speeds else None,
            }
        return {"budgets": budgets, "val_rounds": self.val_rounds}

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        summary = self.summary()
        (self.run_dir / SUMMARY).write_text(json.dumps(summary, indent=1))
        print(format_summary(summary))

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, StoppedBetweenSteps):  # a signal ended the run between steps: it still reports
            self.on_fit_end(trainer, module)


def format_summary(summary: dict) -> str:
    """The summary as a table, one row per budget; the last round's validation loss of each group (e.g.
    small and large words) in a column of its own."""
    first = summary["val_rounds"][0]["budgets"] if summary["val_rounds"] else {}
    last = summary["val_rounds"][-1]["budgets"] if summary["val_rounds"] else {}
    groups = sorted({group for result in last.values() for group in result["groups"]})
    lines = [
        f"{'budget':>6} {'steps':>6} {'train loss: first quarter → last':>34} {'val loss: first → last round':>30} "
        f"{'images/s':>9}"
        + "".join(f" {'last val: ' + group:>16}" for group in groups)
    ]
    for budget, row in summary["budgets"].items():
        val = f"{first[budget]['loss']:.3f} → {last[budget]['loss']:.3f}" if budget in first and budget in last else "-"
        train = f"{row['train_loss_first_quarter']:.3f} → {row['train_loss_last_quarter']:.3f}"
        speed = f"{row['images_per_s']:.1f}" if row["images_per_s"] is not None else "-"
        by_group = "".join(
            f" {last[budget]['groups'][group]:>16.3f}" if group in last.get(budget, {}).get("groups", {}) else f" {'-':>16}"
            for group in groups
        )
        lines.append(f"{budget:>6} {row['steps']:>6} {train:>34} {val:>30} {speed:>9}{by_group}")
    return "\n".join(lines)
