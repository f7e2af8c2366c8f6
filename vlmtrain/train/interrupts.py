"""Stopping a run on a signal without losing its work.

SIGINT (Ctrl-C), SIGTERM (what SLURM and Kubernetes send before killing a job) and SIGUSR1 (SLURM's warning,
``--signal=USR1@90``) ask the run to stop: after the current step every rank saves a checkpoint (atomically,
as every checkpoint) and the run summary, no validation round follows, and ``vlmtrain fit`` exits with one line
naming the checkpoint and code 128 + the signal. A signal that comes between steps — while the run waits for
data, or during a validation round — stops a one-process run at once, with the checkpoint of the last step (a
loader that finds nothing usable cannot hold the run past the grace period); several processes stop after
their next step, at the same one. A run that has not ended ``trainer.stop_within`` seconds after the signal
(a rank waiting for data holds every other rank inside its step) exits then, with the checkpoint it has and
everything it started ended, rather than be killed without a word. A second Ctrl-C stops at once. Under
SLURM, a job stopped by SIGUSR1 (its time is up) asks to be requeued, and ``resume=auto`` then continues it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from types import FrameType

import lightning as L
import psutil
import torch
from lightning.pytorch.loggers import CSVLogger

from vlmtrain.data.batch import Step
from vlmtrain.train.checkpoints import AtomicCheckpoint
from vlmtrain.train.layout import RECIPE_FILE, latest_checkpoint

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold :data:`SIGNALS` while the block runs, each one that comes meanwhile handled when it ends (by the handler
    it would have had): for a write that the exception a signal raises between steps must not cut short
    (:class:`StoppedBetweenSteps`). Python runs signal handlers in the main thread only, so elsewhere nothing is held
    (a per-thread signal mask would not do: the signal goes to another thread and its handler still runs here)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    came: list[int] = []
    for signum in SIGNALS:
        signal.signal(signum, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in came:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            else:
                os.kill(os.getpid(), signum)


class CSVMetrics(CSVLogger):
    """Lightning's CSV logger, its file written with the stop signals held: it is written after a step's end, when a
    signal raises where it lands, and a rewrite cut short (a new column rewrites the file) loses the rows before."""

    def save(self) -> None:
        with signals_held():
            super().save()


class StoppedBetweenSteps(Exception):
    """A signal came between steps of a one-process run: its checkpoint is saved, the run ends at once."""


class StopOnSignal(L.Callback):
    """Installs the signal handlers when a fit starts (after Lightning's own, which it replaces: they would
    broadcast from inside a signal handler) and stops the run cleanly at the end of the step that saw one, or
    at once between steps (see the module docstring). Every step the ranks agree on whether any of them was
    signalled, so all stop at the same step."""

    def __init__(self, checkpoint: AtomicCheckpoint, stop_within: float) -> None:
        self.checkpoint = checkpoint
        self.stop_within = stop_within
        self.deadline: threading.Timer | None = None
        self.received: int | None = None
        self.stopped_at: int | None = None
        self.between_steps = False  # waiting for data or validating: no step is half done
        self._running: tuple[L.Trainer, L.LightningModule] | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            os._exit(128 + signum)  # the second Ctrl-C: stop at once
        self.received = signum
        name = signal.Signals(signum).name
        self.arm_deadline(signum, self.stop_within)
        running = self._running
        if self.between_steps and running is not None and running[0].world_size == 1 and not self.checkpoint.saving:
            log.warning("received %s between steps: stopping now, with a checkpoint of the last step", name)
            self.stop(*running)
            raise StoppedBetweenSteps(name)
        log.warning("received %s: stopping after this step, with a checkpoint", name)

    def arm_deadline(self, signum: int, seconds: float) -> None:
        """Exit ``seconds`` from now unless the run has ended by then (see the module docstring)."""
        if self.deadline is None or not self.deadline.is_alive():
            self.deadline = threading.Timer(seconds, self.exit_now, args=(signum,))
            self.deadline.daemon = True
            self.deadline.start()

    def exit_now(self, signum: int) -> None:
        """The run did not end in time: say where it can continue from, end what it started, exit 128 + signal."""
        if self.checkpoint.saving:  # a checkpoint being written is worth the wait
            self.arm_deadline(signum, 1.0)
            return
        latest = latest_checkpoint(self.checkpoint.directory)
        run_dir = self.checkpoint.directory.parent
        where = f"checkpoint {latest}" if latest is not None else "no checkpoint yet"
        within = f"trainer.stop_within={self.stop_within:g} s"
        late = (
            f"at step {self.stopped_at}; the run's end took longer than {within}" if self.stopped_at is not None
            else f"no step could end within {within} (a rank waiting for data?)"
        )
        line = (
            f"stopped: {signal.Signals(signum).name}: {late}; {where}; "
            f"continue with: vlmtrain fit {run_dir / RECIPE_FILE} resume=auto\n"
        )
        sys.stderr.flush()
        os.write(sys.stderr.fileno(), line.encode())  # one write: every rank says it, and lines must not interleave
        for process in psutil.Process().children(recursive=True):  # data workers, their commands, other ranks
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        os._exit(128 + signum)

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # from fit start: Lightning fetches the first batch before training starts, and that batch may never come
        self._running = (trainer, module)
        self.between_steps = True
        self.install_handlers()

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # Lightning registered its own SIGTERM handling after fit start (wrapping ours): ours alone from here on,
        # and a SIGTERM it noted meanwhile (which ours handled too) must not stop the run its own way
        self.install_handlers()
        trainer._signal_connector.received_sigterm = False

    def install_handlers(self) -> None:
        """Handle :data:`SIGNALS` (whoever runs the fit restores the handlers it had: :func:`handlers_kept`)."""
        for signum in SIGNALS:
            signal.signal(signum, self.handle)

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, step: Step, batch_idx: int) -> None:
        self.between_steps = False

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.between_steps = False  # the last checkpoint is being written: a signal now only stops what follows

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self.between_steps = False

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, step: Step, batch_idx: int) -> None:
        signalled = self.received or 0
        if trainer.world_size > 1:  # some ranks may have been signalled, others not yet
            flag = torch.tensor([signalled], device=module.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signalled = int(flag.item())
        if not signalled:
            self.between_steps = True
            return
        self.received = signalled
        self.stop(trainer, module)
        trainer.should_stop = True
        trainer.limit_val_batches = 0  # Lightning would validate before stopping: the grace period is short

    def stop(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Save the checkpoint of the last step; under SLURM, a run whose time is up asks to be requeued."""
        self.checkpoint.save(trainer, module)
        self.stopped_at = trainer.global_step
        if self.received == signal.SIGUSR1 and trainer.is_global_zero and os.environ.get("SLURM_JOB_ID"):
            requeue(os.environ["SLURM_JOB_ID"])


@contextlib.contextmanager
def handlers_kept() -> Iterator[None]:
    """Inside, the handlers of :data:`SIGNALS` may change (Lightning's, :class:`StopOnSignal`'s); after, they are
    what they were before."""
    kept = {signum: signal.getsignal(signum) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in kept.items():
            signal.signal(signum, handler)


def requeue(job: str) -> None:
    """Ask SLURM to start the job again (its checkpoint is saved; resume=auto continues it)."""
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        log.warning("scontrol requeue %s: %s", job, "done" if result.returncode == 0 else result.stderr.strip())
    except (OSError, subprocess.TimeoutExpired) as error:
        log.warning("scontrol requeue %s failed: %s", job, error)
