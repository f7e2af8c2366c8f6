"""Vision backbones: the packed patches of a batch's images in (image after image, nothing padded), one
feature per patch out.

Every backbone exposes ``patch_size`` and ``width``; the geometry and the projector read them from here.
Attention stays inside each image: the native ViT runs varlen flash attention over the packed sequence on
a GPU (``cu_seqlens``, as NaViT and Qwen2-VL do) and dense attention over images of equal length elsewhere;
the Hugging Face towers run their images in groups of one patch grid, each group dense and unpadded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Segments


@dataclass(frozen=True)
class Group:
    """Images of a packed batch that share a key (their patch grid, or their length): their indices and the
    rows of their patches, image after image."""

    key: tuple[int, ...]
    images: list[int]
    rows: torch.Tensor


def groups(patch_grids: torch.Tensor, by: Callable[[tuple[int, int]], tuple[int, ...]]) -> list[Group]:
    """The images of a batch grouped by ``by(patch grid)``, in order of first appearance."""
    grids = [tuple(grid) for grid in patch_grids.tolist()]
    offsets = [0]
    for rows, cols in grids:
        offsets.append(offsets[-1] + rows * cols)
    found: dict[tuple[int, ...], list[int]] = {}
    for index, grid in enumerate(grids):
        found.setdefault(by(grid), []).append(index)
    device = patch_grids.device
    return [
        Group(key, images, torch.cat([torch.arange(offsets[i], offsets[i + 1], device=device) for i in images]))
        for key, images in found.items()
    ]


def by_grid(grid: tuple[int, int]) -> tuple[int, int]:
    return grid


def run_by_grid(
    pixels: torch.Tensor, positions: torch.Tensor, patch_grids: torch.Tensor, width: int, dtype: torch.dtype,
    dense: Callable[[torch.Tensor, torch.Tensor, tuple[int, int]], torch.Tensor],
) -> torch.Tensor:
    """Features ``(P, width)`` of packed images from ``dense(pixels (n, N, .), positions (n, N, 2), grid)``, run
    once per patch grid on the images of that grid (no padding, no mask; the number of calls varies)."""
    out = pixels.new_zeros(pixels.shape[0], width, dtype=dtype)
    for group in groups(patch_grids, by_grid):
        count = len(group.images)
        features = dense(pixels[group.rows].view(count, -1, pixels.shape[1]), positions[group.rows].view(count, -1, 2), group.key)
        out = out.index_copy(0, group.rows, features.reshape(-1, width).to(dtype))  # autocast may compute in bf16
    return out


def in_lockstep() -> bool:
    """Whether several processes train together: each must then call every module as often as the others
    (ZeRO-3 gathers a module's weights, a collective, at each call)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


WIDEST_ASPECT = 4.0  # aspect classes split log(rows / cols) evenly from 1:4 to 4:1; wider images join the ends


def aspect_class(grid: tuple[int, int], classes: int) -> int:
    """Which of ``classes`` equal steps of log aspect ratio (1:4 to 4:1) the patch grid falls in."""
    rows, cols = grid
    position = (math.log(rows / cols) / math.log(WIDEST_ASPECT) + 1) / 2  # 0 at 1:4, 1 at 4:1
    return min(classes - 1, max(0, int(position * classes)))


def bin_members(grids: list[tuple[int, int]], bins: tuple[int, ...], aspect_classes: int = 1) -> list[list[int]]:
    """The images of each (bin, aspect class), bin after bin: an image goes to the first bin whose most
    patches it does not exceed (the last if none), and within it to its :func:`aspect_class`."""
    members: list[list[int]] = [[] for _ in range(len(bins) * aspect_classes)]
    for index, (rows, cols) in enumerate(grids):
        level = next((b for b, cap in enumerate(bins) if rows * cols <= cap), len(bins) - 1)
        members[level * aspect_classes + aspect_class((rows, cols), aspect_classes)].append(index)
    return members


def run_in_bins(
    pixels: torch.Tensor,
    positions: torch.Tensor,
    patch_grids: torch.Tensor,
    bins: tuple[int, ...],
    width: int,
    dtype: torch.dtype,
    dense: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    aspect_classes: int = 1,
) -> torch.Tensor:
    """Features ``(P, width)`` of packed images from ``dense(pixels (n, N, .), positions (n, N, 2), grids (n, 2))``,
    called once per bin of patch counts (``bins``: the most patches of each; :func:`bin_members`): the images
    of a bin are padded to its longest (positions -1 there), so images of one budget level, nearly equal in
    length, share a call with little padding. ``aspect_classes`` > 1 splits each bin by aspect ratio too, for
    a ``dense`` that pads in 2-D (a conv stem's canvases: rows and columns each as many as the most). With
    several processes every (bin, class) is called, an empty one on a blank one-patch image, so that all
    ranks call each module equally often."""
    counts = patch_grids.prod(1).tolist()
    members = bin_members([tuple(grid) for grid in patch_grids.tolist()], bins, aspect_classes)
    pieces_pixels, pieces_positions = pixels.split(counts), positions.split(counts)
    offsets = [0, *torch.tensor(counts).cumsum(0).tolist()]
    out = pixels.new_zeros(pixels.shape[0], width, dtype=dtype)
    unused = out.new_zeros(())
    for images in members:
        if not images:
            if in_lockstep():
                blank = dense(pixels.new_zeros(1, 1, pixels.shape[1]), positions.new_zeros(1, 1, 2), patch_grids.new_ones(1, 2))
                unused = unused + 0.0 * blank.sum().to(dtype)
            continue
        batch_pixels = nn.utils.rnn.pad_sequence([pieces_pixels[i] for i in images], batch_first=True)
        batch_positions = nn.utils.rnn.pad_sequence([pieces_positions[i] for i in images], batch_first=True, padding_value=-1)
        features = dense(batch_pixels, batch_positions, patch_grids[images]).to(dtype)  # autocast may compute in bf16
        rows = torch.cat([torch.arange(offsets[i], offsets[i + 1], device=pixels.device) for i in images])
        out = out.index_copy(0, rows, features[batch_positions[..., 0] >= 0])
    return out + unused


class VisionBackbone(nn.Module):
    """Base of all backbones. ``forward(pixels, positions, patch_grids)`` → ``(P, width)`` features.

    ``pixels``: ``(P, patch*patch*3)`` uint8, packed; ``positions``: ``(P, 2)`` patch (x, y) in its image;
    ``patch_grids``: ``(I, 2)`` (rows, cols) of each image. ``bins`` (the most patches an image has at each
    budget level; :func:`run_in_bins`) is set when the model is built from its geometry. A tower that also feeds
    the LM's first layers (Qwen3-VL's DeepStack) gives ``layer_features`` more ``width``-wide column blocks, one
    per layer, after its tokens' own.
    """

    patch_size: int
    width: int
    bins: tuple[int, ...] = (2**62,)
    layer_features: int = 0

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor, patch_grids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def unit_pixels(pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 pixels → ``dtype`` in [0, 1]."""
    return pixels.to(dtype) / 255.0


def canvases(pixels: torch.Tensor, grid: tuple[int, int], patch_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Images of one patch grid re-assembled from their patches ``(n, rows*cols, .)``: ``(n, 3, H, W)`` in [0, 1]."""
    rows, cols = grid
    canvas = unit_pixels(pixels, dtype).view(-1, rows, cols, patch_size, patch_size, 3).permute(0, 5, 1, 3, 2, 4)
    return canvas.reshape(-1, 3, rows * patch_size, cols * patch_size)


class Rope2D(nn.Module):
    """Axial 2-D rotary embedding: half of each head rotates with the patch column, half with the row.
    Works for any grid, so images of any size and aspect ratio share one encoder."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head size divisible by 4, got {head_dim}")
        self.quarter, self.theta = head_dim // 4, theta
        self.register_buffer("inv_freq", torch.empty(self.quarter), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Compute the frequencies (a non-persistent buffer: also when transformers materialises an exported
        model built on the meta device, see the export's modelling code)."""
        self.inv_freq.copy_(self.theta ** (-torch.arange(self.quarter, dtype=torch.float32) / self.quarter))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape ``(P, 1, head_dim)`` for (x, y) ``positions`` ``(P, 2)``."""
        angles = positions.float()[..., None] * self.inv_freq  # (P, 2, quarter)
        angles = torch.cat([angles[:, 0], angles[:, 0], angles[:, 1], angles[:, 1]], dim=-1)
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
    """Pre-norm transformer block with 2-D RoPE self-attention and a GELU MLP, over packed images."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, images: Segments) -> torch.Tensor:
        length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(length, 3, self.heads, -1).unbind(1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        x = x + self.proj(images.attend(q, k, v, causal=False).reshape(length, width))
        return x + self.mlp(self.norm2(x))


class LinearStem(nn.Module):
    """The classic ViT patch embedding: one linear map of each patch's pixels."""

    def __init__(self, patch_size: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * patch_size * patch_size, width)
        nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(self.proj.in_features))

    def forward(
        self, pixels: torch.Tensor, positions: torch.Tensor, patch_grids: torch.Tensor, bins: tuple[int, ...] = ()
    ) -> torch.Tensor:
        return self.proj(unit_pixels(pixels, self.proj.weight.dtype) * 2.0 - 1.0)


STEM_ASPECT_CLASSES = 8  # under ZeRO-3 the conv stem's canvases pad a few percent, not half (docs/data-pipeline.md)


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

    def forward(
        self, pixels: torch.Tensor, positions: torch.Tensor, patch_grids: torch.Tensor, bins: tuple[int, ...] = (2**62,)
    ) -> torch.Tensor:
        """The convolutions run once per patch grid over the images of that grid (:func:`run_by_grid`: nothing
        padded) or, when several processes must call them equally often, once per bin and aspect class
        (:func:`run_in_bins`), each image at the top left of a canvas of the group's most rows and most columns
        (images of one level and a like shape, so the canvases are mostly image); everything outside an image
        is zeroed after every layer, as its own zero padding would be, so each image gets exactly what it
        would get alone."""
        dtype = self.convs[0].weight.dtype
        size = self.patch_size

        def dense(images: torch.Tensor, _: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
            count = images.shape[0]
            most_rows, most_cols = (int(value) for value in grids.max(0).values)
            canvas = images.new_zeros(count, most_rows, most_cols, size, size, 3)
            mask = torch.zeros(count, 1, most_rows * size, most_cols * size, dtype=dtype, device=images.device)
            for index, (rows, cols) in enumerate(grids.tolist()):
                canvas[index, :rows, :cols] = images[index, : rows * cols].view(rows, cols, size, size, 3)
                mask[index, :, : rows * size, : cols * size] = 1
            x = (
                unit_pixels(canvas.permute(0, 5, 1, 3, 2, 4).reshape(count, 3, most_rows * size, most_cols * size), dtype) * 2 - 1
            ) * mask
            for layer in self.convs:
                x = layer(x)
                if isinstance(layer, nn.Conv2d):
                    mask = mask[:, :, ::2, ::2]
                    x = x * mask
            features = x.flatten(2).transpose(1, 2).view(count, most_rows, most_cols, -1)
            out = features.new_zeros(count, images.shape[1], features.shape[-1])
            for index, (rows, cols) in enumerate(grids.tolist()):
                out[index, : rows * cols] = features[index, :rows, :cols].reshape(rows * cols, -1)
            return out

        if in_lockstep():
            features = run_in_bins(pixels, positions, patch_grids, bins, self.width, dtype, dense, STEM_ASPECT_CLASSES)
            return self.norm(features)

        def one_grid(images: torch.Tensor, places: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
            return dense(images, places, patch_grids.new_tensor([grid]).expand(images.shape[0], 2))

        return self.norm(run_by_grid(pixels, positions, patch_grids, self.width, dtype, one_grid))


STEM_CLASSES = {"conv": ConvStem, "linear": LinearStem}  # by the names the registry checks (.backbones.STEMS)


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
        if stem not in STEM_CLASSES:
            raise ValueError(f"unknown stem {stem!r}; choose {' or '.join(STEM_CLASSES)}")
        self.stem = STEM_CLASSES[stem](patch_size, width)
        self.rope = Rope2D(width // heads, rope_theta)
        self.blocks = nn.ModuleList(ViTBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor, patch_grids: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixels, positions, patch_grids, self.bins)
        images = Segments.of_lengths(patch_grids.prod(1).tolist(), x.device)
        cos, sin = self.rope(positions)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, images, use_reentrant=False)
            else:
                x = block(x, cos, sin, images)
        return self.norm(x)
