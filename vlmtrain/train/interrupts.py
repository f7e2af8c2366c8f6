"""Stopping a run on a signal without losing its work.

SIGINT (Ctrl-C), SIGTERM (what SLURM and Kubernetes send before killing a job) and SIGUSR1 (SLURM's warning,
``--signal=USR1@90``) ask the run to stop: after the current step every rank saves a checkpoint (atomically,
as every checkpoint) and the run summary, and ``vlmtrain fit`` exits with one line naming the checkpoint and
code 128 + the signal. A second Ctrl-C stops at once. Under SLURM, a job stopped by SIGUSR1 (its time is up)
asks to be requeued, and ``resume=auto`` then continues it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from types import FrameType

import lightning as L
import torch

from vlmtrain.data.batch import Step
from vlmtrain.train.checkpoints import AtomicCheckpoint

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StopOnSignal(L.Callback):
    """Installs the signal handlers when training starts (after Lightning's own, which it replaces: they would
    broadcast from inside a signal handler) and stops the run cleanly at the end of the step that saw one.
    Every step the ranks agree on whether any of them was signalled, so all stop at the same step."""

    def __init__(self, checkpoint: AtomicCheckpoint) -> None:
        self.checkpoint = checkpoint
        self.received: int | None = None
        self.stopped_at: int | None = None
        self._previous: dict[int, object] = {}

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            os._exit(128 + signum)  # the second Ctrl-C: stop at once
        self.received = signum
        log.warning("received %s: stopping after this step, with a checkpoint", signal.Signals(signum).name)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self.handle)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, step: Step, batch_idx: int) -> None:
        signalled = self.received or 0
        if trainer.world_size > 1:  # some ranks may have been signalled, others not yet
            flag = torch.tensor([signalled], device=module.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signalled = int(flag.item())
        if not signalled:
            return
        self.received = signalled
        self.checkpoint.save(trainer, module)
        self.stopped_at = trainer.global_step
        trainer.should_stop = True
        if signalled == signal.SIGUSR1 and trainer.is_global_zero and os.environ.get("SLURM_JOB_ID"):
            requeue(os.environ["SLURM_JOB_ID"])


def requeue(job: str) -> None:
    """Ask SLURM to start the job again (its checkpoint is saved; resume=auto continues it)."""
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        log.warning("scontrol requeue %s: %s", job, "done" if result.returncode == 0 else result.stderr.strip())
    except (OSError, subprocess.TimeoutExpired) as error:
        log.warning("scontrol requeue %s failed: %s", job, error)
