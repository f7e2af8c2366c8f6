"""The recipe's budget section, the budget schedule, and the two rules about budgets that the rest of the
system calls: whether budget settings are valid (:func:`check_budget_settings`) and how many LM tokens a
sample costs in a step (:func:`step_cost`).

The schedule is a pure function of (seed, step), so every rank and every data worker agree without
talking and a resumed run continues the same schedule.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

from vlmtrain.modeling.geometry import DEFAULT_BUDGET, LEVELS, BudgetError, check_levels
from vlmtrain.seeding import text_id, unit

MODES = ("sample", "matryoshka")
PER_IMAGE = ("shared", "independent")


@dataclass
class BudgetConfig:
    """The recipe's ``budget`` section: token budgets trained, their sampling weights, and the budget used when
    none is given (``default`` null: 280, or the level nearest to it when the levels leave 280 out).
    ``per_image: shared`` gives all images of a batch its budget; ``independent`` draws each image's own. A
    budget fixed in a record wins. Its rules: :func:`check_budget_settings`."""

    levels: list[int] = field(default_factory=lambda: list(LEVELS))
    weights: list[float] | None = None
    mode: str = "sample"
    default: int | None = None
    per_image: str = "shared"


def check_budget_settings(
    levels: Sequence[int], weights: Sequence[float] | None, mode: str, default: int | None = None, per_image: str = "shared"
) -> None:
    """The one rule for budget settings; raises :class:`BudgetError` whose key names the setting."""
    check_levels(tuple(levels))
    if weights is not None:
        if len(weights) != len(levels):
            raise BudgetError(f"has {len(weights)} entries for {len(levels)} levels", "weights")
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise BudgetError(f"must be finite, >= 0, with a positive sum, got {list(weights)}", "weights")
    if mode not in MODES:
        raise BudgetError(f"{mode!r} is not one of {', '.join(MODES)}", "mode")
    if default is not None and default not in levels:
        raise BudgetError(f"{default} is not in budget.levels {list(levels)}", "default")
    if per_image not in PER_IMAGE:
        raise BudgetError(f"{per_image!r} is not one of {', '.join(PER_IMAGE)}", "per_image")
    if per_image == "independent" and mode != "sample":
        raise BudgetError(
            "independent budgets per image need budget.mode: sample (matryoshka trains every image at every level)", "per_image"
        )


def default_budget(levels: Sequence[int], default: int | None) -> int:
    """The budget used when none is given: ``default``, or Gemma 4's 280 when the levels hold it, else the
    level nearest to it (a narrowed level list needs no default of its own)."""
    if default is not None:
        return default
    if DEFAULT_BUDGET in levels:
        return DEFAULT_BUDGET
    return min(levels, key=lambda level: (abs(math.log(level / DEFAULT_BUDGET)), -level))


def step_cost(visual_tokens: Callable[[int], int], text_tokens: int, budgets: Sequence[int]) -> int:
    """LM tokens one sample takes in a step trained at ``budgets``: its visual tokens at each budget (as
    ``visual_tokens(budget)`` gives them) plus its text, once per budget. Token caps are sums of this."""
    return sum(visual_tokens(budget) + text_tokens for budget in budgets)


@dataclass(frozen=True)
class BudgetSchedule:
    """Draws the budget of each batch, or of each image, from ``levels`` with ``weights``.

    ``mode="sample"`` trains each batch at one budget; ``mode="matryoshka"`` trains every batch at
    all ``levels`` and averages the losses (Matryoshka Multimodal Models). ``per_image="independent"``
    draws each image's budget on its own, from (seed, step, sample key, image index).
    """

    levels: tuple[int, ...]
    weights: tuple[float, ...]
    seed: int
    mode: str = "sample"
    per_image: str = "shared"

    def __post_init__(self) -> None:
        check_budget_settings(self.levels, self.weights, self.mode, per_image=self.per_image)

    @classmethod
    def of(cls, budget: BudgetConfig, seed: int) -> BudgetSchedule:
        """The schedule a recipe's ``budget`` section describes (uniform weights unless given)."""
        weights = tuple(budget.weights) if budget.weights is not None else (1.0,) * len(budget.levels)
        return cls(tuple(budget.levels), weights, seed, budget.mode, budget.per_image)

    @classmethod
    def uniform(
        cls, levels: Sequence[int] = LEVELS, seed: int = 0, mode: str = "sample", per_image: str = "shared"
    ) -> BudgetSchedule:
        return cls(tuple(levels), (1.0,) * len(levels), seed, mode, per_image)

    def budgets(self, step: int) -> tuple[int | None, ...]:
        """Budgets that the batches of ``step`` are trained at; ``(None,)``: one batch whose images each
        have their own (:meth:`image_budget`)."""
        if self.mode == "matryoshka":
            return self.levels
        if self.per_image == "independent":
            return (None,)
        return (self.sample(step),)

    def possible_budgets(self) -> list[tuple[int, ...]]:
        """Every budget set a step's images can be at, all at one level (the costliest case of each)."""
        return [self.levels] if self.mode == "matryoshka" else [(level,) for level in self.levels]

    def largest_cost(self, visual_tokens: Callable[[int], int], text_tokens: int) -> int:
        """The most LM tokens a sample can take in any step of this schedule (see :func:`step_cost`)."""
        return max(step_cost(visual_tokens, text_tokens, budgets) for budgets in self.possible_budgets())

    def sample(self, step: int) -> int:
        """The one budget drawn for ``step`` (the weights' categorical distribution, hashed from seed and step)."""
        return self._draw(unit(self.seed, step))

    def image_budget(self, step: int, key: str, index: int) -> int:
        """The budget of image ``index`` of sample ``key`` at ``step`` (independent budgets per image)."""
        return self._draw(unit(self.seed, step, text_id(key), index, 0x1A6E))

    def image_budgets(self, step: int, key: str, budget: int | None, fixed: Sequence[int | None]) -> tuple[int, ...]:
        """The budget of each image of a sample in a batch at ``budget`` (None: each image its own draw); a
        budget fixed in the record wins."""
        return tuple(
            mine if mine is not None else budget if budget is not None else self.image_budget(step, key, index)
            for index, mine in enumerate(fixed)
        )

    def video_budget(self, step: int, key: str, video: int, levels: Sequence[int], weights: Sequence[float]) -> int:
        """The budget of every frame of video ``video`` of sample ``key`` at ``step``, drawn from the videos'
        own ``levels`` and ``weights`` (the recipe's ``data.video``)."""
        return categorical(levels, weights, unit(self.seed, step, text_id(key), video, 0x71DE0))

    def _draw(self, u: float) -> int:
        return categorical(self.levels, self.weights, u)


def categorical(levels: Sequence[int], weights: Sequence[float], u: float) -> int:
    """The level that ``u`` in [0, 1) picks from ``levels`` with ``weights`` (inverse of their cumulative sum)."""
    cumulative = list(accumulate(weights))
    index = bisect_right(cumulative, u * cumulative[-1])
    return levels[min(index, len(levels) - 1)]
