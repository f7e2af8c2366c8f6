"""Budget geometry: the one place that turns (image size, token budget) into pixels, patches and tokens.

The image transform, the encoder, the pooling and the number of image placeholders in the text all
read their sizes from :meth:`Geometry.image`; nothing else computes a resize or a token count.
With ``patch_size=16, pool=3`` the result equals Gemma 4's image processor (``max_soft_tokens``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from .errors import InvalidSetting, UserError

LEVELS: tuple[int, ...] = (70, 140, 280, 560, 1120)
DEFAULT_BUDGET = 280
MAX_UPSCALE = 8  # a 640x640 image may become at most 8 times larger at the largest level (Gemma 4: 2.5)


class BudgetError(InvalidSetting):
    """A token budget or budget setting that is not allowed; ``key`` names the setting (e.g. ``levels[1]``)."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(key, message)


def check_budget(budget: int, levels: tuple[int, ...] = LEVELS) -> int:
    """Return ``budget`` if it is one of ``levels``; raise :class:`BudgetError` naming the allowed levels."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget not in levels:
        allowed = ", ".join(str(level) for level in levels)
        raise BudgetError(f"token budget {budget!r} is not allowed; allowed levels: {allowed}")
    return budget


def check_levels(levels: tuple[int, ...] | list[int]) -> None:
    """The one rule for a list of budget levels: a non-empty subset of :data:`LEVELS`, each once. Raises
    :class:`BudgetError` whose key names the offending entry."""
    allowed = ", ".join(str(level) for level in LEVELS)
    if not levels:
        raise BudgetError(f"must list at least one of {allowed}", "levels")
    for index, level in enumerate(levels):
        if level not in LEVELS:
            nearest = min(LEVELS, key=lambda candidate: abs(math.log(candidate / max(level, 1))))  # levels double
            raise BudgetError(f"{level} is not a token level; allowed: {allowed} (nearest: {nearest})", f"levels[{index}]")
    if len(set(levels)) != len(levels):
        raise BudgetError(f"lists a level twice: {list(levels)}", "levels")


@dataclass(frozen=True)
class ImageGeometry:
    """Sizes of one image at one budget: pixels after resize, patch grid and visual-token grid (rows, cols)."""

    resize: tuple[int, int]
    patch_grid: tuple[int, int]
    token_grid: tuple[int, int]

    @property
    def patches(self) -> int:
        return self.patch_grid[0] * self.patch_grid[1]

    @property
    def tokens(self) -> int:
        return self.token_grid[0] * self.token_grid[1]


@dataclass(frozen=True)
class Geometry:
    """Patch size and pool size of a model, and the budgets it serves.

    One visual token covers a ``cell`` × ``cell`` square of pixels, ``cell = patch_size * pool``.
    """

    patch_size: int
    pool: int
    levels: tuple[int, ...] = LEVELS

    def __post_init__(self) -> None:
        if self.patch_size < 1 or self.pool < 1:
            raise UserError(f"patch size and pool must be >= 1, got {self.patch_size} and {self.pool}")
        check_levels(self.levels)
        largest = max(self.levels)
        side = _image_geometry(640, 640, largest, self.patch_size, self.pool).resize[0]
        if side > MAX_UPSCALE * 640:
            patches = (side // self.patch_size) ** 2
            raise UserError(
                f"patch {self.patch_size} x pool {self.pool}: one token covers {self.cell}x{self.cell} px, so a 640x640 image "
                f"becomes {side}x{side} px ({patches:,} patches) at {largest} tokens; use a smaller pool size"
            )

    @property
    def cell(self) -> int:
        return self.patch_size * self.pool

    def max_patches(self, budget: int) -> int:
        """Patches an image may use at ``budget``: the encoder's sequence cap."""
        return check_budget(budget, self.levels) * self.pool**2

    def image(self, height: int, width: int, budget: int) -> ImageGeometry:
        """Geometry of an ``height`` × ``width`` image at ``budget`` (at most ``budget`` tokens, aspect kept)."""
        check_budget(budget, self.levels)
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        return _image_geometry(int(height), int(width), budget, self.patch_size, self.pool)


@lru_cache(maxsize=65536)
def _image_geometry(height: int, width: int, budget: int, patch_size: int, pool: int) -> ImageGeometry:
    # Same arithmetic, in the same floating-point order, as Gemma 4's get_aspect_ratio_preserving_size,
    # so that the two agree on every size (tested against transformers).
    max_patches = budget * pool**2
    target_px = max_patches * patch_size**2
    factor = math.sqrt(target_px / (height * width))
    cell = patch_size * pool
    resized_h = int(math.floor(factor * height / cell)) * cell
    resized_w = int(math.floor(factor * width / cell)) * cell
    # An extreme aspect ratio rounds the short side to zero: give it one cell and let the long side
    # follow the aspect ratio, capped so the image still fits the budget.
    max_side = (max_patches // pool**2) * cell
    if resized_h == 0:
        resized_h = cell
        resized_w = min(int(math.floor(width / height)) * cell, max_side)
    elif resized_w == 0:
        resized_w = cell
        resized_h = min(int(math.floor(height / width)) * cell, max_side)
    token_grid = (resized_h // cell, resized_w // cell)
    if token_grid[0] * token_grid[1] > budget:  # cannot happen; guards the invariant the whole system rests on
        raise AssertionError(f"{height}x{width} at budget {budget} gave {token_grid} tokens")
    return ImageGeometry(
        resize=(resized_h, resized_w),
        patch_grid=(token_grid[0] * pool, token_grid[1] * pool),
        token_grid=token_grid,
    )


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``WIDTHxHEIGHT`` (e.g. ``1024x768``) into ``(height, width)``."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise UserError(f"image size {text!r} must look like WIDTHxHEIGHT, e.g. 1024x768")
    width, height = (int(part) for part in parts)
    if width < 1 or height < 1:
        raise UserError(f"image size {text!r} must be positive")
    return height, width


def geometry_table(geometry: Geometry, height: int, width: int) -> str:
    """A text table of resize, patch grid and tokens at every level, for ``vlmtrain geometry``."""
    header = f"{'budget':>6}  {'resize (WxH)':>13}  {'patches':>13}  {'tokens':>12}  {'used':>5}"
    rows = [
        f"image {width}x{height}, patch {geometry.patch_size}, pool {geometry.pool} "
        f"({geometry.cell}x{geometry.cell} px per token)",
        header,
    ]
    for budget in geometry.levels:
        g = geometry.image(height, width, budget)
        rows.append(
            f"{budget:>6}  {g.resize[1]:>6}x{g.resize[0]:<6}  "
            f"{g.patch_grid[1]:>3}x{g.patch_grid[0]:<3}={g.patches:<5}  "
            f"{g.token_grid[1]:>3}x{g.token_grid[0]:<3}={g.tokens:<4}  {g.tokens / budget:>5.0%}"
        )
    return "\n".join(rows)
