"""Checkpoints that are either complete or absent (layout: :mod:`vlmtrain.train.layout`).

A checkpoint is written under ``.partial`` and renamed when complete; ``latest`` is replaced atomically;
the last K are kept. A run killed while saving leaves a ``.partial`` entry that nothing reads and the
next save removes.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_only
from safetensors.torch import save_file

from vlmtrain.train.adapters import whole_values
from vlmtrain.train.layout import LATEST, PARTIAL, STATE, TRAINED, checkpoint_name, latest_checkpoint


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def trained_weights(module: L.LightningModule, strategy: L.pytorch.strategies.Strategy) -> dict[str, torch.Tensor]:
    """Every trained parameter of ``module`` by its state-dict name, whole and on CPU (tied parameters once).
    Collective: every rank calls it."""
    return whole_values([(name, p) for name, p in module.named_parameters() if p.requires_grad], strategy)


@rank_zero_only
def _publish(directory: Path, partial: Path, final: Path, keep: int) -> None:
    """Rename a finished checkpoint into place, point ``latest`` at it, delete all but the last ``keep``."""
    _remove(final)
    os.replace(partial, final)
    pointer = directory / (LATEST + PARTIAL)
    pointer.write_text(final.name)
    os.replace(pointer, directory / LATEST)
    complete = sorted(p for p in directory.glob("step-*") if not p.name.endswith(PARTIAL))
    for old in complete[:-keep]:
        _remove(old)
    for stale in directory.glob(f"*{PARTIAL}"):
        if stale.name != LATEST + PARTIAL:
            _remove(stale)


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written (the last complete one is untouched)."""


def no_space_message(error: OSError, final: Path, last: Path | None) -> str:
    """One line for a full disk: what was being written, where, and what is safe."""
    where = str(error.filename or final)
    staged = (
        " (Lightning writes a checkpoint to a temporary file in /tmp first: /tmp is the one that is full)"
        if where.startswith(tempfile.gettempdir())
        else ""
    )
    kept = f"the last complete checkpoint, {last}, is untouched" if last is not None else "no earlier checkpoint exists"
    return f"no space left writing {final}: {error.strerror} at {where}{staged}; {kept}"


class AtomicCheckpoint(Checkpoint):
    """Saves every ``every`` optimizer steps and at the end of training; keeps the last ``keep``.

    A :class:`Checkpoint`, so Lightning runs it after every other callback: the data position the
    checkpoint records includes the batch just trained."""

    def __init__(self, directory: Path, every: int, keep: int) -> None:
        self.directory = directory
        self.every = every
        self.keep = keep
        self.saved_step = -1
        self.saving = False  # a save is under way (a signal must not start another inside it)

    def save(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self.saved_step or step == 0:
            return
        self.saving = True
        try:
            self._save(trainer, module, step)
        finally:
            self.saving = False

    def _save(self, trainer: L.Trainer, module: L.LightningModule, step: int) -> None:
        final = self.directory / checkpoint_name(step)
        partial = final.with_name(final.name + PARTIAL)
        if trainer.is_global_zero:
            _remove(partial)
            partial.mkdir(parents=True)
        trainer.strategy.barrier("checkpoint-start")
        try:
            trainer.save_checkpoint(partial / STATE, weights_only=False)  # every rank: DeepSpeed writes its shards
            weights = trained_weights(module, trainer.strategy)
            if trainer.is_global_zero:
                save_file(weights, str(partial / TRAINED))
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            _remove(partial)
            raise CheckpointError(no_space_message(error, final, latest_checkpoint(self.directory))) from None
        trainer.strategy.barrier("checkpoint-written")
        _publish(self.directory, partial, final, self.keep)
        trainer.strategy.barrier("checkpoint-published")
        self.saved_step = step

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % self.every == 0:
            self.save(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.save(trainer, module)
