"""Aspect-ratio buckets: a pool of still-encoded samples from which each batch takes one bucket at one budget.

A sample's bucket at a budget is the token grid of each of its images there, computed from the sizes
in its JSON record — nothing is decoded to bucket it. Images of one bucket resize to the same grid, so a
batch carries (almost) no padding. Each step takes the bucket that fills the token cap best; a sample
that has waited ``max_wait`` steps goes first, so rare shapes never starve.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from vlmtrain.data.samples import RawSample
from vlmtrain.data.sources import Position


@dataclass
class Waiting:
    """A sample in the pool: its position in the stream, epoch, text length, and the step it arrived at."""

    position: Position
    epoch: int
    sample: RawSample
    text_tokens: int
    arrived: int


class BucketPool:
    """Holds up to ``capacity`` samples and hands out batches of one bucket within a token cap."""

    def __init__(self, capacity: int, max_wait: int) -> None:
        self.capacity = capacity
        self.max_wait = max_wait
        self.waiting: list[Waiting] = []

    def __len__(self) -> int:
        return len(self.waiting)

    @property
    def full(self) -> bool:
        return len(self.waiting) >= self.capacity

    @property
    def oldest_epoch(self) -> int | None:
        """The earliest epoch among the waiting samples (None when empty)."""
        return min((entry.epoch for entry in self.waiting), default=None)

    def add(self, entry: Waiting) -> None:
        self.waiting.append(entry)

    def take(
        self,
        bucket: Callable[[Waiting], Hashable],
        cost: Callable[[Waiting], int],
        cap: int,
        max_size: int,
        step: int,
        rng: random.Random,
    ) -> list[Waiting]:
        """Remove and return one batch: samples of one bucket whose total ``cost`` stays within ``cap``.

        Samples costing more than ``cap`` are left for a cheaper budget. Returns nothing when no sample fits.
        """
        groups: dict[Hashable, list[Waiting]] = defaultdict(list)
        for entry in self.waiting:
            if cost(entry) <= cap:
                groups[bucket(entry)].append(entry)
        if not groups:
            return []
        oldest = min((g[0] for g in groups.values()), key=lambda entry: entry.arrived)
        if step - oldest.arrived >= self.max_wait:
            members = groups[bucket(oldest)]
            members = [oldest] + rng.sample([m for m in members if m is not oldest], len(members) - 1)
        else:
            # the bucket that fills the cap best; ties go to the bucket waiting longest
            members = max(groups.values(), key=lambda g: (min(sum(cost(m) for m in g), cap), -g[0].arrived))
            members = rng.sample(members, len(members))
        chosen, total = [], 0
        for entry in members:
            if len(chosen) == max_size:
                break
            if total + cost(entry) <= cap:
                chosen.append(entry)
                total += cost(entry)
        taken = {id(entry) for entry in chosen}
        self.waiting = [entry for entry in self.waiting if id(entry) not in taken]
        return chosen
