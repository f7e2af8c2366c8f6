"""The budget schedule: which token budget(s) the batch at position ``step`` is trained at.

A pure function of (seed, step), so every rank and every data worker agree without talking and a
resumed run continues the same schedule.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate

from vlmtrain.geometry import check_budget
from vlmtrain.seeding import unit


@dataclass(frozen=True)
class BudgetSchedule:
    """Draws the budget of each batch from ``levels`` with ``weights``.

    ``mode="sample"`` trains each batch at one budget; ``mode="matryoshka"`` trains every batch at
    all ``levels`` and averages the losses (Matryoshka Multimodal Models).
    """

    levels: tuple[int, ...]
    weights: tuple[float, ...]
    seed: int
    mode: str = "sample"

    def __post_init__(self) -> None:
        for level in self.levels:
            check_budget(level)
        if len(self.weights) != len(self.levels):
            raise ValueError(f"{len(self.weights)} weights given for {len(self.levels)} budget levels")
        if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError(f"budget weights must be >= 0 with a positive sum, got {list(self.weights)}")
        if self.mode not in ("sample", "matryoshka"):
            raise ValueError(f"budget mode must be 'sample' or 'matryoshka', got {self.mode!r}")

    def budgets(self, step: int) -> tuple[int, ...]:
        """Budgets that the batch at position ``step`` is trained at."""
        if self.mode == "matryoshka":
            return self.levels
        return (self.sample(step),)

    def sample(self, step: int) -> int:
        """The one budget drawn for ``step`` (the weights' categorical distribution, hashed from seed and step)."""
        cumulative = list(accumulate(self.weights))
        index = bisect_right(cumulative, unit(self.seed, step) * cumulative[-1])
        return self.levels[min(index, len(self.levels) - 1)]
