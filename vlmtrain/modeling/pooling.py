"""Pooling: each pool×pool window of patches (by patch position) becomes one visual token.

The output of every pooling is exactly the token grids of the geometry, row-major, image after image, as
the text's placeholders expect them; a mismatch between patches and promised grids raises.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class GeometryMismatch(RuntimeError):
    """The patches reaching the model do not form the token grids the geometry promised."""


def gather_windows(features: torch.Tensor, positions: torch.Tensor, token_grids: torch.Tensor, pool: int) -> torch.Tensor:
    """Regroup packed patch features ``(P, D)`` into windows ``(T, pool*pool, D)`` by patch position: every
    image's tokens row-major, image after image (``T``: all tokens of the batch).

    Window ``t = (y // pool) * cols + x // pool`` of an image holds its patches in (y % pool, x % pool) order.
    """
    counts = token_grids[:, 0] * token_grids[:, 1]
    lengths = counts * pool * pool
    if int(lengths.sum()) != features.shape[0]:
        raise GeometryMismatch(f"{features.shape[0]} patches do not fill token grids {token_grids.tolist()} at pool {pool}")
    image = torch.repeat_interleave(torch.arange(counts.shape[0], device=features.device), lengths)
    rows, cols = token_grids[image, 0], token_grids[image, 1]
    x, y = positions[:, 0], positions[:, 1]
    if bool(((x < 0) | (y < 0) | (x >= cols * pool) | (y >= rows * pool)).any()):
        raise GeometryMismatch(f"patch positions fall outside token grids {token_grids.tolist()} at pool {pool}")
    first_token = torch.cumsum(counts, 0) - counts
    slot = (first_token[image] + (y // pool) * cols + x // pool) * pool * pool + (y % pool) * pool + x % pool
    order = torch.argsort(slot)
    if not torch.equal(slot[order], torch.arange(slot.shape[0], device=slot.device)):
        raise GeometryMismatch(f"patches do not fill token grids {token_grids.tolist()} at pool {pool} (a window slot twice)")
    return features[order].view(-1, pool * pool, features.shape[1])


class Pooling(nn.Module):
    """Base of poolings: ``forward(features, positions, token_grids)`` → ``(T, D)``: every image's visual tokens,
    row-major, image after image."""

    def __init__(self, pool: int) -> None:
        super().__init__()
        self.pool = pool


class AveragePooling(Pooling):
    """Mean of each window (Gemma 4's pooling by patch position)."""

    def forward(self, features: torch.Tensor, positions: torch.Tensor, token_grids: torch.Tensor) -> torch.Tensor:
        return gather_windows(features, positions, token_grids, self.pool).mean(dim=1)


class AttentionPooling(Pooling):
    """A learned query attends over each window's patches (keys carry their offset in the window).

    The attention output projection starts at zero, so training starts from average pooling and learns
    what to add to it.
    """

    def __init__(self, pool: int, width: int, heads: int) -> None:
        super().__init__(pool)
        if width % heads:
            raise ValueError(f"attention pooling: width {width} is not divisible by {heads} heads")
        self.query = nn.Parameter(torch.zeros(width))
        self.offset = nn.Parameter(torch.randn(pool * pool, width) * 0.02)
        self.norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        nn.init.zeros_(self.attention.out_proj.weight)
        nn.init.zeros_(self.attention.out_proj.bias)

    def forward(self, features: torch.Tensor, positions: torch.Tensor, token_grids: torch.Tensor) -> torch.Tensor:
        windows = gather_windows(features, positions, token_grids, self.pool)
        tokens, _, width = windows.shape
        mean = windows.mean(dim=1)
        keys = self.norm(windows + self.offset)
        query = (self.query + mean).view(tokens, 1, width)
        attended, _ = self.attention(query, keys, keys, need_weights=False)
        return mean + attended.view(tokens, width)


class TowerPooling(Pooling):
    """For an encoder that pools itself (Qwen2.5-VL's patch merger): its output already is one row per token."""

    def forward(self, features: torch.Tensor, positions: torch.Tensor, token_grids: torch.Tensor) -> torch.Tensor:
        tokens = int((token_grids[:, 0] * token_grids[:, 1]).sum())
        if features.shape[0] != tokens:
            raise GeometryMismatch(f"the encoder gave {features.shape[0]} tokens, the geometry promised {tokens}")
        return features


POOLINGS: dict[str, Callable[[int, int, int], Pooling]] = {  # kind → build(pool, width, heads)
    "average": lambda pool, width, heads: AveragePooling(pool),
    "attention": AttentionPooling,
    "tower": lambda pool, width, heads: TowerPooling(pool),
}


def build_pooling(kind: str, pool: int, width: int, heads: int) -> Pooling:
    """The pooling named ``kind`` (one of :data:`POOLINGS`)."""
    if kind not in POOLINGS:
        raise ValueError(f"unknown pooling {kind!r}; choose {' or '.join(POOLINGS)}")
    return POOLINGS[kind](pool, width, heads)
