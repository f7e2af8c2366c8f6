"""The LightningDataModule: training streams of this rank, one validation stream per budget, and the data
position that checkpoints save and resumed runs continue from."""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import multiprocessing
import os
import signal

import lightning as L
import psutil
import torch.distributed as dist
from torch.utils.data import DataLoader

from vlmtrain.budget import BudgetSchedule
from vlmtrain.data.batch import Step
from vlmtrain.data.builder import BatchBuilder
from vlmtrain.data.config import DataConfig
from vlmtrain.data.pipeline import EvalStream, StreamState, TrainStream
from vlmtrain.data.sources import ShardSequence, Source, StreamId, expand_shards

log = logging.getLogger(__name__)


def _ignore_stop_signals(worker: int) -> None:
    """Data workers leave SIGINT, SIGTERM and SIGUSR1 to the training process, which stops the run cleanly
    (a terminal's Ctrl-C and SLURM's signals reach every process of the job, workers included); the training
    process ends them itself when it exits (:func:`end_workers`)."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


def end_workers() -> None:
    """End this process's data workers at once (SIGKILL), with what they started (a ``pipe:`` shard's command).
    They ignore SIGTERM, and at exit multiprocessing terminates its daemonic children with SIGTERM and then
    waits for them: without this, a run that fails while its workers live (an error, a stream of nothing
    usable) would print its error and never exit."""
    for process in multiprocessing.active_children():
        if process.daemon:  # DataLoader workers; not processes that others started to outlive this one
            try:
                started = psutil.Process(process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                started = []
            for child in [process, *started]:
                with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
            process.join(timeout=10)


@functools.cache
def end_workers_at_exit() -> None:
    """Run :func:`end_workers` when the interpreter exits, whatever the exit path (once per process; registered
    after multiprocessing's own exit handler, so it runs first)."""
    atexit.register(end_workers)


def _unbatched(item):
    """The streams yield whole steps and batches: the DataLoader must pass them through untouched."""
    return item


def sources_of(data: DataConfig) -> list[Source]:
    """The recipe's training sources, shard specs expanded (local shards must exist)."""
    specs = [(entry.spec, entry.weight) for entry in data.sources] or [(data.train, 1.0)]
    return [Source(tuple(expand_shards(spec)), weight) for spec, weight in specs]


class ShardDataModule(L.LightningDataModule):
    """Training batches from the recipe's sources on the budget schedule; validation at each budget."""

    def __init__(self, data: DataConfig, builder: BatchBuilder, schedule: BudgetSchedule) -> None:
        super().__init__()
        self.data = data
        self.builder = builder
        self.schedule = schedule
        self.sources = sources_of(data)
        self.val_urls = expand_shards(data.val) if data.val else []
        self.next_step = 0
        self.streams: dict[int, StreamState] = {}

    @property
    def rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    @property
    def stream_count(self) -> int:
        return max(1, self.data.num_workers)

    def setup(self, stage: str) -> None:
        """Refuse, before any worker starts, a split that would leave a stream without shards."""
        rank, world = self.rank_and_world
        for index in range(self.stream_count):
            ShardSequence(self.sources, self.schedule.seed, StreamId(rank, world, index, self.stream_count), self.data.resampled)

    def train_dataloader(self) -> DataLoader:
        end_workers_at_exit()
        rank, world = self.rank_and_world
        stream = TrainStream(self.sources, self.builder, self.schedule, self.data, rank, world, self.next_step, self.streams)
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return DataLoader(
            stream, batch_size=None, collate_fn=_unbatched, num_workers=self.data.num_workers, pin_memory=on_gpu,
            worker_init_fn=_ignore_stop_signals,
        )

    def val_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(
                EvalStream(
                    self.val_urls,
                    self.builder,
                    budget,
                    self.data.val_samples,
                    self.data.batching.batch_tokens,
                    self.data.batching.max_batch_size,
                    packed=self.data.batching.packing,
                ),
                batch_size=None,
                collate_fn=_unbatched,
            )
            for budget in (self.schedule.levels if self.val_urls else ())
        ]

    def record(self, step: Step) -> None:
        """A step was trained: the run continues after it, its stream from the state it left."""
        self.next_step = step.index + 1
        self.streams[step.position.stream] = StreamState.from_dict(step.position.state)

    def state_dict(self) -> dict:
        """The data position of every rank (gathered to all ranks: any of them may write the checkpoint)."""
        mine = {"next_step": self.next_step, "streams": {index: s.to_dict() for index, s in self.streams.items()}}
        _, world = self.rank_and_world
        ranks = [mine]
        if world > 1 and dist.is_available() and dist.is_initialized():
            ranks = [None] * world
            dist.all_gather_object(ranks, mine)
        return {"world": world, "stream_count": self.stream_count, "ranks": ranks}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's data position; with another world size or worker count the streams
        differ, so training continues at the saved step with the streams starting their epochs afresh."""
        rank, world = self.rank_and_world
        mine = state["ranks"][rank if state["world"] == world else 0]
        self.next_step = mine["next_step"]
        if state["world"] == world and state["stream_count"] == self.stream_count:
            self.streams = {int(index): StreamState.from_dict(s) for index, s in mine["streams"].items()}
        else:
            log.warning(
                "data position saved with %d ranks x %d workers, resuming with %d x %d: streams restart from their first shard",
                state["world"],
                state["stream_count"],
                world,
                self.stream_count,
            )
            self.streams = {}
