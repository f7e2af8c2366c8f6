"""Pooling: each pool×pool window of patches (by patch position) becomes one visual token.

The output of every pooling is exactly the token grid of the geometry, row-major, one row per image
padded to the batch's largest token count; a mismatch between patches and promised grid raises.
"""

from __future__ import annotations

import torch
from torch import nn


class GeometryMismatch(RuntimeError):
    """The patches reaching the model do not form the token grids the geometry promised."""


def gather_windows(
    features: torch.Tensor, positions: torch.Tensor, token_grids: torch.Tensor, pool: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Regroup patch features ``(I, N, D)`` into windows ``(I, T, pool*pool, D)`` by patch position.

    Window ``t = (y // pool) * cols + x // pool`` holds its patches in (y % pool, x % pool) order.
    Returns the windows and a ``(I, T)`` mask of real tokens (``T`` = the largest token count).
    """
    images, _, width = features.shape
    x, y = positions[..., 0], positions[..., 1]
    valid = x >= 0
    rows, cols = token_grids[:, :1], token_grids[:, 1:]
    counts = (rows * cols).squeeze(1)
    inside = (x < cols * pool) & (y < rows * pool)
    if bool(((valid.sum(1) != counts * pool * pool) | (valid & ~inside).any(1)).any()):
        raise GeometryMismatch(
            f"patches per image {valid.sum(1).tolist()} do not fill token grids {token_grids.tolist()} at pool {pool}"
        )
    tokens = int(counts.max()) if images else 0
    window_size = pool * pool
    slot = ((y // pool) * cols + x // pool) * window_size + (y % pool) * pool + x % pool
    slot = torch.where(valid, slot, tokens * window_size)  # padding goes to one spare slot, dropped below
    windows = features.new_zeros(images, tokens * window_size + 1, width)
    windows = windows.scatter(1, slot[..., None].expand(-1, -1, width), features)
    token_mask = torch.arange(tokens, device=features.device)[None, :] < counts[:, None]
    return windows[:, :-1].view(images, tokens, window_size, width), token_mask


class Pooling(nn.Module):
    """Base of poolings: ``forward(features, positions, token_grids)`` → ``(I, T, D)`` tokens and ``(I, T)`` mask."""

    def __init__(self, pool: int) -> None:
        super().__init__()
        self.pool = pool


class AveragePooling(Pooling):
    """Mean of each window (Gemma 4's pooling by patch position)."""

    def forward(
        self, features: torch.Tensor, positions: torch.Tensor, token_grids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        windows, token_mask = gather_windows(features, positions, token_grids, self.pool)
        return windows.mean(dim=2), token_mask


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

    def forward(
        self, features: torch.Tensor, positions: torch.Tensor, token_grids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        windows, token_mask = gather_windows(features, positions, token_grids, self.pool)
        images, tokens, window_size, width = windows.shape
        mean = windows.mean(dim=2)
        keys = self.norm(windows + self.offset).view(images * tokens, window_size, width)
        query = (self.query + mean).view(images * tokens, 1, width)
        attended, _ = self.attention(query, keys, keys, need_weights=False)
        return mean + attended.view(images, tokens, width), token_mask


def build_pooling(kind: str, pool: int, width: int, heads: int) -> Pooling:
    """The pooling named ``kind`` (``average`` or ``attention``)."""
    if kind == "average":
        return AveragePooling(pool)
    if kind == "attention":
        return AttentionPooling(pool, width, heads)
    raise ValueError(f"unknown pooling {kind!r}; choose average or attention")
