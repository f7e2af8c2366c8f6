"""Streaming batches from WebDataset shards.

A DataLoader asks its workers for batches in turn, so batch ``k`` of worker ``w`` (of ``W``) is batch
``start + k*W + w`` of the run: each worker computes the budget of its batches from the schedule
(seed, step) on its own, and every rank, whose loader runs the same schedule, agrees with it.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from itertools import count
from pathlib import Path

from torch.utils.data import IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples

from vlmtrain.budget import BudgetSchedule, unit_hash
from vlmtrain.data.batch import Batch
from vlmtrain.data.builder import BatchBuilder, EncodedSample
from vlmtrain.data.samples import RawSample, SampleError, parse_sample

log = logging.getLogger(__name__)


def expand_shards(spec: str) -> list[str]:
    """Expand a shard spec (brace patterns, ``::``-separated lists, ``pipe:`` URLs); local files must exist."""
    urls = expand_urls(spec)
    local = [url for url in urls if "://" not in url and not url.startswith("pipe:")]
    missing = [url for url in local if not Path(url).is_file()]
    if not urls or missing:
        raise FileNotFoundError(f"shard spec {spec!r}: {len(missing)} of {len(urls)} shards not found, e.g. {missing[:1]}")
    return urls


class SkipLog:
    """Counts skipped samples by kind and logs them at a limited rate (the 1st, 2nd, 4th, 8th... of each kind).

    More than ``max_consecutive`` skips with no usable sample between them stop the run with an error,
    so a stream of nothing but bad data fails loudly instead of spinning.
    """

    def __init__(self, max_consecutive: int = 1000) -> None:
        self.counts: Counter[str] = Counter()
        self.max_consecutive = max_consecutive
        self.consecutive = 0

    def add(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        self.consecutive += 1
        seen = self.counts[kind]
        if seen & (seen - 1) == 0:
            log.warning("skipped sample (%s, %d so far): %s", kind, seen, message)
        if self.consecutive > self.max_consecutive:
            raise RuntimeError(f"{self.consecutive} samples in a row were unusable; last ({kind}): {message}")

    def ok(self) -> None:
        """A usable sample arrived: the run of failures is broken."""
        self.consecutive = 0


def read_samples(urls: Iterable[str], skips: SkipLog) -> Iterator[RawSample]:
    """Raw samples of the shards at ``urls`` in order; malformed samples are skipped, and a shard that breaks
    off (truncated, unreadable) delivers the samples before the break and counts once as ``bad_shard``."""
    for url in urls:
        errors: list[Exception] = []
        for files in tarfile_samples([{"url": url}], handler=lambda error: errors.append(error) is None):
            try:
                yield parse_sample(files)
            except SampleError as error:
                skips.add(error.kind, str(error))
        if errors:
            skips.add("bad_shard", f"{url}: {type(errors[0]).__name__}: {errors[0]}")


def shuffled(samples: Iterable[RawSample], buffer: int, rng: random.Random) -> Iterator[RawSample]:
    """Shuffle a stream through a buffer of ``buffer`` samples (raw bytes, so the buffer stays small)."""
    pool: list[RawSample] = []
    for sample in samples:
        pool.append(sample)
        if len(pool) >= buffer:
            i = rng.randrange(len(pool))
            pool[i], pool[-1] = pool[-1], pool[i]
            yield pool.pop()
    rng.shuffle(pool)
    yield from pool


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _Lookahead:
    """An iterator whose next item can be looked at before it is taken; ``None`` once it is exhausted."""

    def __init__(self, items: Iterator[RawSample]) -> None:
        self._items = items
        self._next: RawSample | None = None

    def peek(self) -> RawSample | None:
        if self._next is None:
            self._next = next(self._items, None)
        return self._next

    def take(self) -> RawSample:
        item = self.peek()
        assert item is not None, "take() past the end"
        self._next = None
        return item


def take_batch(samples: _Lookahead, cost: Callable[[RawSample], int], cap: int, max_size: int, skips: SkipLog) -> list[RawSample]:
    """Take samples while their visual tokens stay within ``cap`` (and at most ``max_size`` of them);
    fewer, possibly none, when the stream ends."""
    chosen: list[RawSample] = []
    total = 0
    while len(chosen) < max_size and samples.peek() is not None:
        tokens = cost(samples.peek())
        if tokens > cap:
            skips.add("over_token_cap", f"sample {samples.take().key!r} needs {tokens} visual tokens, cap is {cap}")
            continue
        if chosen and total + tokens > cap:
            break
        chosen.append(samples.take())
        total += tokens
    return chosen


def encode_all(builder: BatchBuilder, samples: list[RawSample], budget: int, skips: SkipLog) -> list[EncodedSample]:
    """Encode samples at ``budget``, skipping (and counting) those that fail."""
    encoded = []
    for sample in samples:
        try:
            encoded.append(builder.encode(sample, budget))
            skips.ok()
        except SampleError as error:
            skips.add(error.kind, f"{error} ({sample.source})")
    return encoded


class TrainStream(IterableDataset):
    """Endless training batches: shards shuffled per epoch from the seed, split across workers, samples
    shuffled through a buffer, batch sizes capped in visual tokens, budgets from the schedule."""

    def __init__(
        self,
        urls: list[str],
        builder: BatchBuilder,
        schedule: BudgetSchedule,
        batch_visual_tokens: int,
        max_batch_size: int,
        shuffle_buffer: int,
        start_step: int = 0,
    ) -> None:
        self.urls = urls
        self.builder = builder
        self.schedule = schedule
        self.batch_visual_tokens = batch_visual_tokens
        self.max_batch_size = max_batch_size
        self.shuffle_buffer = shuffle_buffer
        self.start_step = start_step
        self.skips = SkipLog()

    def samples(self, worker: int, workers: int) -> Iterator[RawSample]:
        """This worker's raw samples, epoch after epoch."""
        if len(self.urls) < workers:
            raise ValueError(f"{len(self.urls)} shards cannot feed {workers} data workers; write more shards or lower data.num_workers")
        for epoch in count():
            order = list(self.urls)
            random.Random(unit_hash(self.schedule.seed, epoch)).shuffle(order)
            rng = random.Random(unit_hash(self.schedule.seed, epoch * 1_000_003 + worker))
            produced = 0
            for sample in shuffled(read_samples(order[worker::workers], self.skips), self.shuffle_buffer, rng):
                produced += 1
                yield sample
            if produced == 0:
                raise RuntimeError(f"data worker {worker} read no usable sample from its shards {order[worker::workers]}")

    def __iter__(self) -> Iterator[Batch | list[Batch]]:
        worker, workers = _worker()
        samples = _Lookahead(self.samples(worker, workers))
        for step in count(self.start_step + worker, workers):
            yield self.batch_at(samples, step)

    def batch_at(self, samples: _Lookahead, step: int) -> Batch | list[Batch]:
        """The batch at schedule position ``step``: one Batch, or one per budget in matryoshka mode."""
        budgets = self.schedule.budgets(step)

        def cost(sample: RawSample) -> int:
            return sum(self.builder.visual_tokens(sample, budget) for budget in budgets)

        while True:
            chosen = take_batch(samples, cost, self.batch_visual_tokens, self.max_batch_size, self.skips)
            encoded = [encode_all(self.builder, chosen, budget, self.skips) for budget in budgets]
            keys = set.intersection(*({s.key for s in per_budget} for per_budget in encoded))
            batches = [
                self.builder.collate([s for s in per_budget if s.key in keys], budget, step)
                for budget, per_budget in zip(budgets, encoded)
            ]
            if keys:
                return batches[0] if len(batches) == 1 else batches


class EvalStream(IterableDataset):
    """The first ``limit`` usable samples of ``urls``, in order, batched at one fixed ``budget``."""

    def __init__(self, urls: list[str], builder: BatchBuilder, budget: int, limit: int, batch_visual_tokens: int, max_batch_size: int) -> None:
        self.urls = urls
        self.builder = builder
        self.budget = budget
        self.limit = limit
        self.batch_visual_tokens = batch_visual_tokens
        self.max_batch_size = max_batch_size
        self.skips = SkipLog()

    def __iter__(self) -> Iterator[Batch]:
        samples = _Lookahead(read_samples(self.urls, self.skips))
        remaining = self.limit

        def cost(sample: RawSample) -> int:
            return self.builder.visual_tokens(sample, self.budget)

        while remaining > 0:
            chosen = take_batch(samples, cost, self.batch_visual_tokens, min(self.max_batch_size, remaining), self.skips)
            if not chosen:
                return
            encoded = encode_all(self.builder, chosen, self.budget, self.skips)
            if encoded:
                remaining -= len(encoded)
                yield self.builder.collate(encoded, self.budget, step=-1)
