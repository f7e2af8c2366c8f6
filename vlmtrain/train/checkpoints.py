"""Checkpoints that are either complete or absent: written under a temporary name, renamed when done,
with ``latest`` pointing at the newest complete one and only the last K kept.

A checkpoint is a file (one device, DDP) or a directory of shards (DeepSpeed). A run killed while
saving leaves a ``.partial`` entry that nothing reads and the next save removes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_only

LATEST = "latest"
PARTIAL = ".partial"


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}.ckpt"


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint in ``directory``, from its ``latest`` pointer."""
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    path = directory / pointer.read_text().strip()
    return path if path.exists() else None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


@rank_zero_only
def _publish(directory: Path, partial: Path, final: Path, keep: int) -> None:
    """Rename a finished checkpoint into place, point ``latest`` at it, delete all but the last ``keep``."""
    _remove(final)
    os.replace(partial, final)
    pointer = directory / (LATEST + PARTIAL)
    pointer.write_text(final.name)
    os.replace(pointer, directory / LATEST)
    complete = sorted(p for p in directory.glob("step-*.ckpt"))
    for old in complete[:-keep]:
        _remove(old)
    for stale in directory.glob(f"*{PARTIAL}"):
        if stale.name != LATEST + PARTIAL:
            _remove(stale)


class AtomicCheckpoint(Checkpoint):
    """Saves every ``every`` optimizer steps and at the end of training; keeps the last ``keep``.

    A :class:`Checkpoint`, so Lightning runs it after every other callback: the data position the
    checkpoint records includes the batch just trained."""

    def __init__(self, directory: Path, every: int, keep: int) -> None:
        self.directory = directory
        self.every = every
        self.keep = keep
        self.saved_step = -1

    def save(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        if step == self.saved_step or step == 0:
            return
        final = self.directory / checkpoint_name(step)
        partial = final.with_name(final.name + PARTIAL)
        if trainer.is_global_zero:
            self.directory.mkdir(parents=True, exist_ok=True)
            _remove(partial)
        trainer.strategy.barrier("checkpoint-start")
        trainer.save_checkpoint(partial, weights_only=False)  # every rank: DeepSpeed writes shards; else rank 0
        trainer.strategy.barrier("checkpoint-written")
        _publish(self.directory, partial, final, self.keep)
        trainer.strategy.barrier("checkpoint-published")
        self.saved_step = step

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % self.every == 0:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.save(trainer)
