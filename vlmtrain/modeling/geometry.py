"""Budget geometry: the one place that turns (image size, token budget) into pixels, patches and tokens.

The image transform, the encoder, the pooling and the number of image placeholders in the text all
read their sizes from :meth:`Geometry.image`; nothing else computes a resize or a token count. Two resize
rules, each equal to a family's own image processor (tested against transformers on many sizes):

- ``fill`` (Gemma 4): the image is scaled up or down to fill the budget; with ``patch_size=16, pool=3`` it
  equals Gemma 4's image processor at ``max_soft_tokens`` = the budget.
- ``smart_resize`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): each side rounded to whole cells, the image shrunk when it
  passes ``max_pixels`` = budget x cell², grown when under ``min_pixels``; with ``patch_size=14, pool=2``
  (Qwen2.5-VL) or ``16, 2`` (Qwen3-VL) it equals their processors at that ``max_pixels``. Where Qwen's own
  arithmetic would pass the budget (an aspect ratio so extreme that the short side is held at one cell), the
  long side is cut to the budget: a budget is a cap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from .errors import InvalidSetting, UserError

LEVELS: tuple[int, ...] = (70, 140, 280, 560, 1120)
DEFAULT_BUDGET = 280
MAX_UPSCALE = 8  # a 640x640 image may become at most 8 times larger at the largest level (Gemma 4: 2.5)
RESIZE_RULES = ("fill", "smart_resize")
MAX_ASPECT = 200  # smart_resize: Qwen's processors refuse images more elongated than this


class ImageSizeError(UserError, ValueError):
    """An image whose size the geometry cannot serve (one that the family's own processor refuses too)."""


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
    """Patch size and pool size of a model, the budgets it serves, and its resize rule (see the module docstring;
    ``min_pixels``: the smallest area ``smart_resize`` leaves an image; ``frames``: the frames one patch spans,
    Qwen-VL's temporal patch of 2, which an image fills with itself and a video with consecutive frames).

    One visual token covers a ``cell`` × ``cell`` square of pixels, ``cell = patch_size * pool``.
    """

    patch_size: int
    pool: int
    levels: tuple[int, ...] = LEVELS
    rule: str = "fill"
    min_pixels: int = 0
    frames: int = 1

    def __post_init__(self) -> None:
        if self.patch_size < 1 or self.pool < 1:
            raise UserError(f"patch size and pool must be >= 1, got {self.patch_size} and {self.pool}")
        if self.rule not in RESIZE_RULES:
            raise UserError(f"resize rule {self.rule!r} is not one of {', '.join(RESIZE_RULES)}")
        check_levels(self.levels)
        if not 0 <= self.min_pixels <= min(self.levels) * self.cell**2:
            raise UserError(
                f"min_pixels {self.min_pixels} must be in [0, {min(self.levels) * self.cell**2}] (the smallest budget's area)"
            )
        largest = max(self.levels)
        side = self.image(640, 640, largest).resize[0]
        if side > MAX_UPSCALE * 640:
            patches = (side // self.patch_size) ** 2
            raise UserError(
                f"patch {self.patch_size} x pool {self.pool}: one token covers {self.cell}x{self.cell} px, so a 640x640 image "
                f"becomes {side}x{side} px ({patches:,} patches) at {largest} tokens; use a smaller pool size"
            )

    @property
    def cell(self) -> int:
        return self.patch_size * self.pool

    @property
    def patch_dim(self) -> int:
        """Values in one patch: ``frames`` RGB squares of ``patch_size``."""
        return self.frames * 3 * self.patch_size**2

    def max_patches(self, budget: int) -> int:
        """Patches an image may use at ``budget``: the encoder's sequence cap."""
        return check_budget(budget, self.levels) * self.pool**2

    def image(self, height: int, width: int, budget: int) -> ImageGeometry:
        """Geometry of an ``height`` × ``width`` image at ``budget`` (at most ``budget`` tokens, aspect kept)."""
        check_budget(budget, self.levels)
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        if self.rule == "smart_resize":
            return _smart_resize_geometry(int(height), int(width), budget, self.patch_size, self.pool, self.min_pixels)
        return _fill_geometry(int(height), int(width), budget, self.patch_size, self.pool)


def _grids(resized: tuple[int, int], cell: int, pool: int, budget: int, size: tuple[int, int]) -> ImageGeometry:
    token_grid = (resized[0] // cell, resized[1] // cell)
    if token_grid[0] * token_grid[1] > budget:  # cannot happen; guards the invariant the whole system rests on
        raise AssertionError(f"{size[0]}x{size[1]} at budget {budget} gave {token_grid} tokens")
    return ImageGeometry(resize=resized, patch_grid=(token_grid[0] * pool, token_grid[1] * pool), token_grid=token_grid)


@lru_cache(maxsize=65536)
def _smart_resize_geometry(height: int, width: int, budget: int, patch_size: int, pool: int, min_pixels: int) -> ImageGeometry:
    # The arithmetic of Qwen2-VL's smart_resize (transformers' qwen2_vl image processors), step for step
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ImageSizeError(f"a {width}x{height} image is more elongated than {MAX_ASPECT}:1, which Qwen's processors refuse")
    cell = patch_size * pool
    max_pixels = budget * cell**2
    h_bar, w_bar = round(height / cell) * cell, round(width / cell) * cell
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(cell, math.floor(height / beta / cell) * cell)
        w_bar = max(cell, math.floor(width / beta / cell) * cell)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / cell) * cell
        w_bar = math.ceil(width * beta / cell) * cell
    # the short side held at one cell can push the long one past the budget: the budget is a cap
    if (h_bar // cell) * (w_bar // cell) > budget:
        if h_bar <= w_bar:
            w_bar = budget // (h_bar // cell) * cell
        else:
            h_bar = budget // (w_bar // cell) * cell
    return _grids((h_bar, w_bar), cell, pool, budget, (height, width))


@lru_cache(maxsize=65536)
def _fill_geometry(height: int, width: int, budget: int, patch_size: int, pool: int) -> ImageGeometry:
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
    return _grids((resized_h, resized_w), cell, pool, budget, (height, width))


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
        f"({geometry.cell}x{geometry.cell} px per token), {geometry.rule}",
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
