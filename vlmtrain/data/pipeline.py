"""Streaming batches from WebDataset shards: buckets, token-capped batch sizes, the budget schedule, resume.

A DataLoader asks its workers for batches in turn, so worker ``w`` of ``W`` produces the batches of
steps ``start + w, start + w + W, ...``: each worker computes the budget of its batches from the
schedule on its own, and every rank, running the same schedule, agrees with it. The samples of a step
come from the stream ``step mod W`` of the rank (see :mod:`vlmtrain.data.sources`); every batch carries
that stream's state, so a restart continues each stream exactly where the last trained batch left it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from torch.utils.data import IterableDataset, get_worker_info

from vlmtrain.budget import BudgetSchedule
from vlmtrain.data.batch import Batch, DataPosition, Step
from vlmtrain.data.buckets import BucketPool, Waiting
from vlmtrain.data.builder import BatchBuilder, Budgets, EncodedSample
from vlmtrain.data.config import DataConfig
from vlmtrain.data.samples import RawSample, SampleError
from vlmtrain.data.sources import Arrival, Position, ShardSequence, Source, StreamId, read_shard, stream_samples
from vlmtrain.data.video import frame_budgets
from vlmtrain.errors import UserError
from vlmtrain.modeling.geometry import BudgetError
from vlmtrain.seeding import rng

log = logging.getLogger(__name__)


class DataError(UserError):
    """Data that cannot feed a run: a stream of nothing but unusable samples or broken shards."""


class SkipLog:
    """Counts skipped samples by kind and logs them at a limited rate (the 1st, 2nd, 4th, 8th... of each kind).

    More than ``max_consecutive`` unusable samples in a row, or the same shard broken ``shard_attempts`` times
    in such a run (one empty shard, a ``pipe:`` command that always fails), stop the run with one line naming
    the shard and the failure, so bad data fails loudly instead of spinning. A sample is known usable twice:
    when it is read (its record and text, :meth:`read_ok`) and when it is decoded (its images,
    :meth:`decoded_ok`); each stage keeps its own run of failures, so a stream whose records are fine but whose
    every image is broken stops too.
    """

    def __init__(self, max_consecutive: int = 1000, counts: dict[str, int] | None = None, shard_attempts: int = 3) -> None:
        self.counts: Counter[str] = Counter(counts or {})
        self.max_consecutive = max_consecutive
        self.shard_attempts = shard_attempts
        self.unreadable = 0  # samples in a row that failed when read
        self.undecodable = 0  # samples in a row that failed when decoded
        self.broken: Counter[str] = Counter()

    def add(self, kind: str, message: str, shard: str | None = None, decoding: bool = False) -> None:
        """A sample that cannot be used (``decoding``: found when its images were decoded)."""
        self.counts[kind] += 1
        if decoding:
            self.undecodable += 1
        else:
            self.unreadable += 1
        seen = self.counts[kind]
        if seen & (seen - 1) == 0:
            log.warning("skipped sample (%s, %d so far): %s", kind, seen, message)
        if kind == "bad_shard" and shard is not None:
            self.broken[shard] += 1
            if self.broken[shard] >= self.shard_attempts:
                raise DataError(f"{message}; read {self.broken[shard]} times with no usable sample from any shard in between")
        run = max(self.unreadable, self.undecodable)
        if run > self.max_consecutive:
            raise DataError(f"{run} samples in a row were unusable; last ({kind}): {message}")

    def read_ok(self) -> None:
        """A sample was read that can be used: the run of read failures is broken."""
        self.unreadable = 0
        self.broken.clear()

    def decoded_ok(self) -> None:
        """A sample's images decoded: the run of decoding failures is broken."""
        self.undecodable = 0


@dataclass
class StreamState:
    """All a stream needs to go on exactly after a batch: the next position to read, the samples read
    but not yet batched as (shard, item, step it arrived at), and the skip counts so far."""

    read: Position = (0, 0)
    pool: list[tuple[int, int, int]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"read": list(self.read), "pool": [list(entry) for entry in self.pool], "skipped": dict(self.skipped)}

    @classmethod
    def from_dict(cls, values: dict) -> StreamState:
        return cls(
            read=tuple(values["read"]), pool=[tuple(entry) for entry in values["pool"]], skipped=dict(values.get("skipped", {}))
        )


def encode_all(builder: BatchBuilder, samples: list[tuple[RawSample, Budgets]], skips: SkipLog) -> list[EncodedSample | None]:
    """Encode (sample, budgets) pairs; a sample that fails is counted and gives None in its place."""
    encoded: list[EncodedSample | None] = []
    for sample, budgets in samples:
        try:
            encoded.append(builder.encode(sample, budgets))
        except SampleError as error:
            skips.add(error.kind, f"{error} ({sample.source})", decoding=True)
            encoded.append(None)
        else:
            skips.decoded_ok()
    return encoded


class TrainStream(IterableDataset):
    """Endless training steps of one rank: one bucket and one budget per batch, at most
    ``data.batching.batch_tokens`` LM tokens (visual plus text) per step, continuing from ``states`` at
    ``start_step``."""

    def __init__(
        self,
        sources: list[Source],
        builder: BatchBuilder,
        schedule: BudgetSchedule,
        data: DataConfig,
        rank: int = 0,
        world: int = 1,
        start_step: int = 0,
        states: dict[int, StreamState] | None = None,
    ) -> None:
        self.sources = sources
        self.builder = builder
        self.schedule = schedule
        self.data = data
        self.rank = rank
        self.world = world
        self.start_step = start_step
        self.states = states or {}

    def shards(self, index: int, count: int) -> ShardSequence:
        return ShardSequence(self.sources, self.schedule.seed, StreamId(self.rank, self.world, index, count), self.data.resampled)

    def __iter__(self) -> Iterator[Step]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        index = (self.start_step + worker) % workers
        yield from self.steps(index, workers, self.start_step + worker)

    def steps(self, index: int, count: int, first_step: int) -> Iterator[Step]:
        """Steps of stream ``index`` (of ``count``): ``first_step``, ``first_step + count``, ..."""
        state = self.states.get(index, StreamState())
        returning = {(k, item): arrived for k, item, arrived in state.pool}
        arrivals = stream_samples(
            self.shards(index, count), min([state.read, *returning]), self.builder.video, self.builder.frame_layout
        )
        batching = self.data.batching
        pool = BucketPool(batching.lookahead, batching.max_wait)
        skips = SkipLog(self.data.max_consecutive_failures, state.skipped)
        read = state.read
        step = first_step
        held: Arrival | None = None  # the first sample of a new epoch waits until the old epoch is batched
        while True:
            while not pool.full:
                arrival, held = held or next(arrivals), None
                if arrival.position < state.read:  # replaying up to where the saved state was
                    if arrival.position in returning and isinstance(arrival.sample, RawSample):
                        pool.add(self.waiting(arrival, returning[arrival.position]))
                    continue
                if len(pool) and arrival.epoch > pool.oldest_epoch:
                    held = arrival
                    break
                read = (arrival.position[0], arrival.position[1] + 1)
                self.admit(arrival, step, pool, skips)
            batches = self.take(pool, step, skips)
            if not batches:  # every sample taken failed to decode: refill and try again
                continue
            after = StreamState(read, [(*entry.position, entry.arrived) for entry in pool.waiting], dict(skips.counts))
            yield Step(index=step, batches=batches, position=DataPosition(index, after.to_dict()))
            step += count

    def waiting(self, arrival: Arrival, step: int) -> Waiting:
        """A pool entry for a usable sample (its text length is measured once, here)."""
        return Waiting(arrival.position, arrival.epoch, arrival.sample, self.builder.text_tokens(arrival.sample), step)

    def admit(self, arrival: Arrival, step: int, pool: BucketPool, skips: SkipLog) -> None:
        """Put a freshly read sample in the pool, or count why it cannot be used."""
        sample = arrival.sample
        try:
            if isinstance(sample, SampleError):
                raise sample
            entry = self.waiting(arrival, step)
            try:
                tokens = self.schedule.largest_cost(
                    lambda budget: self.builder.visual_tokens(sample, self.assign(entry, budget)), entry.text_tokens
                )
            except BudgetError as error:
                raise SampleError(
                    "budget_not_trained", f"sample {sample.key!r} fixes a budget the model is not trained at: {error}"
                ) from None
            if tokens > self.data.batching.batch_tokens:
                raise SampleError("over_token_cap", f"sample {sample.key!r} needs {tokens} tokens at the largest budget")
        except SampleError as error:
            skips.add(error.kind, f"{error} (shard {arrival.url})", arrival.url)
            return
        pool.add(entry)
        skips.read_ok()

    def assign(self, entry: Waiting, budget: int | None) -> tuple[int, ...]:
        """The budget of each of the sample's images in a batch at ``budget``; drawn independently, from the
        step the sample arrived at (so each sample keeps its draw while it waits, and which samples a batch
        takes cannot favour any budget; see :meth:`~vlmtrain.budget.BudgetSchedule.image_budgets`)."""
        fixed = frame_budgets(entry.sample, self.builder.video, self.schedule, entry.arrived)
        return self.schedule.image_budgets(entry.arrived, entry.sample.key, budget, fixed)

    def take(self, pool: BucketPool, step: int, skips: SkipLog) -> list[Batch]:
        """The batch(es) of ``step``: one bucket, one budget each (several budgets in matryoshka mode). With
        a budget per image, a bucket holds the samples whose images have the same budgets (their grids may
        differ, the batch pads them to the longest: logged as data/padding)."""
        budgets = self.schedule.budgets(step)
        builder = self.builder
        batching = self.data.batching
        independent = self.schedule.per_image == "independent"

        def cost(entry: Waiting) -> int:
            return builder.cost(entry.sample, entry.text_tokens, [self.assign(entry, budget) for budget in budgets])

        def bucket(entry: Waiting) -> tuple | None:
            if batching.packing or not batching.buckets:  # packed: any grids share a step, nothing padded
                return None
            if independent:
                return tuple(tuple(sorted(self.assign(entry, budget))) for budget in budgets)
            return tuple(builder.token_grids(entry.sample, self.assign(entry, budget)) for budget in budgets)

        chooser = rng(self.schedule.seed, self.rank, step)
        chosen = pool.take(bucket, cost, batching.batch_tokens, batching.max_batch_size, step, chooser)
        encoded = [
            encode_all(builder, [(entry.sample, self.assign(entry, budget)) for entry in chosen], skips)
            for budget in budgets
        ]
        kept = [i for i in range(len(chosen)) if all(per_budget[i] is not None for per_budget in encoded)]
        if not kept:
            return []
        batches = []
        for budget, per_budget in zip(budgets, encoded, strict=True):
            batch = builder.collate([per_budget[i] for i in kept], budget, batching.packing, batching.row_tokens)
            batch.epochs = [chosen[i].epoch for i in kept]
            batches.append(batch)
        return batches


class EvalStream(IterableDataset):
    """The first ``limit`` usable samples of ``urls`` (those whose record matches ``where``), in order,
    batched at one fixed ``budget``, or at the budgets per image that ``budget(sample)`` chooses."""

    def __init__(
        self,
        urls: list[str],
        builder: BatchBuilder,
        budget: int | Callable[[RawSample], Budgets],
        limit: int,
        batch_tokens: int,
        max_batch_size: int,
        where: dict[str, str] | None = None,
        packed: bool = True,
    ) -> None:
        self.packed = packed
        self.urls = urls
        self.builder = builder
        self.budget = budget
        self.limit = limit
        self.batch_tokens = batch_tokens
        self.max_batch_size = max_batch_size
        self.where = where or {}
        self.skips = SkipLog()

    def samples(self) -> Iterator[RawSample]:
        for url in self.urls:
            for sample in read_shard(url, self.builder.video, self.builder.frame_layout):
                if isinstance(sample, SampleError):
                    self.skips.add(sample.kind, f"{sample} (shard {url})", url)
                elif all(str(sample.record.get(field)) == value for field, value in self.where.items()):
                    self.skips.read_ok()
                    yield sample

    def __iter__(self) -> Iterator[Batch]:
        for _, batch in self.batches():
            yield batch

    def batches(self) -> Iterator[tuple[list[tuple[RawSample, EncodedSample]], Batch]]:
        """The batches, each with its (sample, encoded sample) pairs in row order."""
        pending: list[tuple[RawSample, EncodedSample]] = []
        used, total = 0, 0
        for sample in self.samples():
            if used >= self.limit:
                break
            budgets = self.budget(sample) if callable(self.budget) else self.budget
            encoded = encode_all(self.builder, [(sample, budgets)], self.skips)[0]
            if encoded is None:
                continue
            cost = self.builder.cost(sample, self.builder.text_tokens(sample), (budgets,))
            if pending and (total + cost > self.batch_tokens or len(pending) == self.max_batch_size):
                yield pending, self.collate(pending)
                pending, total = [], 0
            pending.append((sample, encoded))
            total += cost
            used += 1
        if pending:
            yield pending, self.collate(pending)

    def collate(self, pending: list[tuple[RawSample, EncodedSample]]) -> Batch:
        """One batch: at the stream's budget, or with its images at budgets of their own."""
        budget = None if callable(self.budget) else self.budget
        return self.builder.collate([item for _, item in pending], budget, self.packed)
