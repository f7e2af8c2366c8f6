"""Following a run: on a terminal, a progress bar that counts steps; anywhere else (a log file under SLURM or
nohup), a plain line every ``trainer.log_every`` steps and at least once a minute."""

from __future__ import annotations

import sys
import time

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_only

from vlmtrain.data.batch import Step
from vlmtrain.reporting import duration
from vlmtrain.train.callbacks import BudgetThroughput, DataProgress


class StepProgressBar(RichProgressBar):
    """Lightning's progress bar, labelled with steps (training is counted in steps here, not epochs)."""

    def _get_train_description(self, current_epoch: int) -> str:
        return "steps"


def step_budget(step: Step) -> str:
    """The budget(s) of a step as the progress line shows them."""
    if len(step.batches) > 1:
        return "all"
    batch = step.batches[0]
    if batch.budget is not None:
        return str(batch.budget)
    return f"~{sum(batch.image_budgets) / max(len(batch.image_budgets), 1):.0f}/image"


class ProgressLog(L.Callback):
    """A plain progress line (rank 0, flushed), every ``every`` steps and at least every ``interval`` seconds:
    step / max steps, budget, loss, tokens/s, images/s, data wait, skipped samples, elapsed and ETA."""

    def __init__(self, every: int, throughput: BudgetThroughput, data: DataProgress, interval: float = 60.0) -> None:
        self.every = every
        self.throughput = throughput
        self.data = data
        self.interval = interval
        self._started = self._last = 0.0
        self._first_step = 0

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._started = self._last = time.monotonic()
        self._first_step = trainer.global_step

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, step: Step, batch_idx: int) -> None:
        now = time.monotonic()
        done = trainer.global_step
        if (batch_idx + 1) % self.every and now - self._last < self.interval and done < trainer.max_steps:
            return
        if now - self._last >= self.interval and (batch_idx + 1) % self.every:
            self.throughput.report(module)  # a minute passed between log_every steps: fresh figures
        self._last = now
        figures = self.throughput.interval
        seconds = max(figures.get("seconds", 0.0) + figures.get("wait", 0.0), 1e-9)
        rate = (done - self._first_step) / max(now - self._started, 1e-9)
        eta = (trainer.max_steps - done) / rate if rate > 0 else 0.0
        line = (
            f"step {done}/{trainer.max_steps} | budget {step_budget(step)} | loss {float(outputs['loss']):.4f} | "
            f"tokens/s {figures.get('tokens', 0) / seconds:,.0f} | images/s {figures.get('images', 0) / seconds:.1f} | "
            f"data wait {figures.get('wait', 0.0):.1f}s | skipped {self.data.total_skipped} | "
            f"elapsed {duration(now - self._started)} | eta {duration(eta)}"
        )
        print(line, flush=True)


def on_a_terminal() -> bool:
    return sys.stdout.isatty()
