"""Vision backbones: a batch of patch sequences (different grids, zero-padded) in, one feature per patch out.

Every backbone exposes ``patch_size`` and ``width``; the geometry and the projector read them from here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class VisionBackbone(nn.Module):
    """Base of all backbones. ``forward(pixels, positions, patch_grids)`` → ``(I, N, width)`` features.

    ``pixels``: ``(I, N, patch*patch*3)`` uint8; ``positions``: ``(I, N, 2)`` patch (x, y), -1 on padding;
    ``patch_grids``: ``(I, 2)`` (rows, cols). Features at padded positions are ignored downstream.
    """

    patch_size: int
    width: int

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor, patch_grids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def unit_pixels(pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 pixels → ``dtype`` in [0, 1]."""
    return pixels.to(dtype) / 255.0


class Rope2D(nn.Module):
    """Axial 2-D rotary embedding: half of each head rotates with the patch column, half with the row.
    Works for any grid, so images of any size and aspect ratio share one encoder."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head size divisible by 4, got {head_dim}")
        quarter = head_dim // 4
        self.register_buffer("inv_freq", theta ** (-torch.arange(quarter, dtype=torch.float32) / quarter), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape ``(I, 1, N, head_dim)`` for (x, y) ``positions``."""
        angles = positions.clamp(min=0).float()[..., None] * self.inv_freq  # (I, N, 2, quarter)
        angles = torch.cat([angles[..., 0, :], angles[..., 0, :], angles[..., 1, :], angles[..., 1, :]], dim=-1)
        return angles.cos()[:, None], angles.sin()[:, None]


def _rotate_halves(x: torch.Tensor) -> torch.Tensor:
    """Rotate each of the two axis halves of ``x`` (last dim) by a quarter turn."""
    x_part, y_part = x.chunk(2, dim=-1)

    def rotate(part: torch.Tensor) -> torch.Tensor:
        first, second = part.chunk(2, dim=-1)
        return torch.cat([-second, first], dim=-1)

    return torch.cat([rotate(x_part), rotate(y_part)], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x * cos + _rotate_halves(x) * sin).to(x.dtype)


class ViTBlock(nn.Module):
    """Pre-norm transformer block with 2-D RoPE self-attention (SDPA) and a GELU MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.norm2(x))


def image_canvases(
    pixels: torch.Tensor, patch_grids: torch.Tensor, patch_size: int, dtype: torch.dtype
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The images of a batch re-assembled from their patches, one group per patch grid: yields the group's
    indices and its images ``(n, 3, rows*patch, cols*patch)`` in [0, 1]. Each image's patches come first
    in its row, row-major (the :class:`~vlmtrain.data.batch.ImageBatch` layout)."""
    for grid in torch.unique(patch_grids, dim=0):
        rows, cols = int(grid[0]), int(grid[1])
        members = torch.nonzero((patch_grids == grid).all(dim=1)).squeeze(1)
        canvas = unit_pixels(pixels[members, : rows * cols], dtype)
        canvas = canvas.view(-1, rows, cols, patch_size, patch_size, 3).permute(0, 5, 1, 3, 2, 4)
        yield members, canvas.reshape(-1, 3, rows * patch_size, cols * patch_size)


class LinearStem(nn.Module):
    """The classic ViT patch embedding: one linear map of each patch's pixels."""

    def __init__(self, patch_size: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * patch_size * patch_size, width)
        nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(self.proj.in_features))

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor, patch_grids: torch.Tensor) -> torch.Tensor:
        return self.proj(unit_pixels(pixels, self.proj.weight.dtype) * 2.0 - 1.0)


class ConvStem(nn.Module):
    """Stride-2 3×3 convolutions over each whole image, down to one vector per patch.

    Unlike a linear embedding it sees across patch borders, which makes a ViT trained from scratch
    learn shapes (letters) far faster ("Early convolutions help transformers see better", 2021).
    Images are re-assembled from their patches; images with the same grid run as one batch.
    """

    def __init__(self, patch_size: int, width: int) -> None:
        super().__init__()
        levels = int(math.log2(patch_size))
        if 2**levels != patch_size or levels < 1:
            raise ValueError(f"the conv stem needs a power-of-two patch size, got {patch_size}")
        channels = [3] + [min(width, 32 * 2**i) for i in range(levels - 1)] + [width]
        layers: list[nn.Module] = []
        for into, out in pairwise(channels):
            layers += [nn.Conv2d(into, out, kernel_size=3, stride=2, padding=1), nn.GELU()]
        self.convs = nn.Sequential(*layers[:-1])
        self.norm = nn.LayerNorm(width)
        self.patch_size = patch_size
        self.width = width

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor, patch_grids: torch.Tensor) -> torch.Tensor:
        dtype = self.convs[0].weight.dtype
        out = pixels.new_zeros(pixels.shape[0], pixels.shape[1], self.width, dtype=dtype)
        for members, canvas in image_canvases(pixels, patch_grids, self.patch_size, dtype):
            features = self.convs(canvas * 2.0 - 1.0).flatten(2).transpose(1, 2)
            out[members, : features.shape[1]] = features.to(out.dtype)  # autocast may compute in bf16
        return self.norm(out)


class NativeViT(VisionBackbone):
    """A compact ViT built from the recipe: a conv (or linear) patch stem, 2-D RoPE blocks, final LayerNorm."""

    def __init__(
        self,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        rope_theta: float = 100.0,
        stem: str = "conv",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.width = width
        self.gradient_checkpointing = gradient_checkpointing
        stems = {"conv": ConvStem, "linear": LinearStem}
        if stem not in stems:
            raise ValueError(f"unknown stem {stem!r}; choose conv or linear")
        self.stem = stems[stem](patch_size, width)
        self.rope = Rope2D(width // heads, rope_theta)
        self.blocks = nn.ModuleList(ViTBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor, patch_grids: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixels, positions, patch_grids)
        valid = positions[..., 0] >= 0
        # No mask when nothing is padded: SDPA can then pick its fastest (flash) kernel.
        attn_mask = None if bool(valid.all()) else valid[:, None, None, :]
        cos, sin = self.rope(positions)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, attn_mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, attn_mask)
        return self.norm(x)
