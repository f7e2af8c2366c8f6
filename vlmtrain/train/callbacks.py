"""Callbacks: throughput per budget, and the end-of-run summary of loss per budget."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from vlmtrain.data.batch import Batch
from vlmtrain.train.module import as_batches


class BudgetThroughput(L.Callback):
    """Logs, per budget, images and visual tokens per second of the training step, and the time spent
    waiting for data before it."""

    def __init__(self) -> None:
        self._step_start: float | None = None
        self._step_end: float | None = None

    @staticmethod
    def _sync(module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Batch | list[Batch], batch_idx: int) -> None:
        self._sync(module)
        self._step_start = time.perf_counter()
        if self._step_end is not None:
            module.log("train/data_wait_s", self._step_start - self._step_end, on_step=True, on_epoch=False, batch_size=1)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch: Batch | list[Batch], batch_idx: int) -> None:
        self._sync(module)
        self._step_end = time.perf_counter()
        seconds = self._step_end - self._step_start
        batches = as_batches(batch)
        images = sum(b.images.count for b in batches)
        tokens = sum(int(b.images.token_counts.sum()) for b in batches)
        suffix = f"@{batches[0].budget}" if len(batches) == 1 else ""
        module.log(f"train/images_per_s{suffix}", images / seconds, on_step=True, on_epoch=False, batch_size=1)
        module.log(f"train/visual_tokens_per_s{suffix}", tokens / seconds, on_step=True, on_epoch=False, batch_size=1)


class DataProgress(L.Callback):
    """After each trained batch: tell the datamodule where the data stands (for checkpoints) and log the
    batch's padding, bucket, data epoch and size, and the samples this rank skipped so far, by kind and
    in total (the total is on the progress bar)."""

    def __init__(self) -> None:
        self.skipped: dict[int, dict[str, int]] = {}

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch: Batch | list[Batch], batch_idx: int) -> None:
        batches = as_batches(batch)
        first = batches[0]
        if trainer.datamodule is not None and hasattr(trainer.datamodule, "record"):
            trainer.datamodule.record(first)
        self.skipped[first.stream] = first.stream_state.get("skipped", {})
        totals: dict[str, int] = {}
        for counts in self.skipped.values():
            for kind, count in counts.items():
                totals[kind] = totals.get(kind, 0) + count
        values = {
            "data/padding": sum(b.images.padding for b in batches) / len(batches),
            "data/epoch": float(min(first.epochs, default=0)),
            "data/samples": float(first.size),
            "data/images": float(first.images.count),
            "skipped": float(sum(totals.values())),
            **{f"data/skipped_{kind}": float(count) for kind, count in totals.items()},
        }
        if first.images.count:
            rows, cols = first.images.token_grids[0].tolist()
            values["data/bucket_aspect"] = cols / rows
        for name, value in values.items():
            module.log(name, value, on_step=True, on_epoch=False, prog_bar=name == "skipped", batch_size=1)


class RunSummary(L.Callback):
    """Collects training loss per budget and each validation round; at the end writes ``summary.json``
    into the run directory and prints a table: does the loss fall at every budget?"""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.train: dict[int, list[float]] = defaultdict(list)
        self.speed: dict[int, list[float]] = defaultdict(list)
        self.val_rounds: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch: Batch | list[Batch], batch_idx: int) -> None:
        budgets = {b.budget for b in as_batches(batch)}
        for name, value in trainer.callback_metrics.items():
            kind, _, budget = name.partition("@")
            if kind in ("train/loss", "train/images_per_s") and budget.isdigit() and int(budget) in budgets:
                (self.train if kind == "train/loss" else self.speed)[int(budget)].append(float(value))

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("val/")}
            self.val_rounds.append({"step": trainer.global_step, **metrics})

    def summary(self) -> dict:
        """Per budget: steps trained, mean training loss over the first and last quarter of them, median
        training images per second; and every validation round."""
        budgets = {}
        for budget, losses in sorted(self.train.items()):
            quarter = max(1, len(losses) // 4)
            speeds = self.speed.get(budget, [])
            budgets[budget] = {
                "steps": len(losses),
                "train_loss_first_quarter": sum(losses[:quarter]) / quarter,
                "train_loss_last_quarter": sum(losses[-quarter:]) / quarter,
                "images_per_s": sorted(speeds)[len(speeds) // 2] if speeds else None,
            }
        return {"budgets": budgets, "val_rounds": self.val_rounds}

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        summary = self.summary()
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        print(format_summary(summary))


def format_summary(summary: dict) -> str:
    """The summary as a table, one row per budget; the last round's validation loss of each group (e.g.
    small and large words) in a column of its own."""
    first = summary["val_rounds"][0] if summary["val_rounds"] else {}
    last = summary["val_rounds"][-1] if summary["val_rounds"] else {}
    groups = sorted({name.split("/")[2] for name in last if name.startswith("val/loss@") and name.count("/") == 2})
    lines = [f"{'budget':>6} {'steps':>6} {'train loss: first quarter → last':>34} {'val loss: first → last round':>30} {'images/s':>9}"
             + "".join(f" {'last val: ' + group:>16}" for group in groups)]
    for budget, row in summary["budgets"].items():
        key = f"val/loss@{budget}"
        val = f"{first[key]:.3f} → {last[key]:.3f}" if key in first and key in last else "-"
        train = f"{row['train_loss_first_quarter']:.3f} → {row['train_loss_last_quarter']:.3f}"
        speed = f"{row['images_per_s']:.1f}" if row["images_per_s"] is not None else "-"
        by_group = "".join(f" {last[f'{key}/{group}']:>16.3f}" if f"{key}/{group}" in last else f" {'-':>16}" for group in groups)
        lines.append(f"{budget:>6} {row['steps']:>6} {train:>34} {val:>30} {speed:>9}{by_group}")
    return "\n".join(lines)
