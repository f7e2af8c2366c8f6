"""The model's input: token ids, attention mask and labels of a batch, and its images cut into patches.

The data pipeline builds these (:mod:`vlmtrain.data`), the model consumes them; nothing else rides along.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageBatch:
    """All images of a batch, in text order.

    ``pixels``: ``(I, N, patch*patch*3)`` uint8, zero after each image's own patches;
    ``positions``: ``(I, N, 2)`` patch (x, y), -1 on padding; ``token_grids``: ``(I, 2)`` visual-token
    (rows, cols) that the geometry promised; ``sample_index``: ``(I,)`` the sample each image belongs to.
    """

    pixels: torch.Tensor
    positions: torch.Tensor
    token_grids: torch.Tensor
    sample_index: torch.Tensor

    @property
    def count(self) -> int:
        return self.pixels.shape[0]

    @property
    def patch_mask(self) -> torch.Tensor:
        return self.positions[..., 0] >= 0

    @property
    def token_counts(self) -> torch.Tensor:
        return self.token_grids[:, 0] * self.token_grids[:, 1]

    @classmethod
    def stack(cls, images: list[tuple[torch.Tensor, torch.Tensor, tuple[int, int], int]], patch_dim: int) -> ImageBatch:
        """Pad and stack ``(pixels, positions, token_grid, sample_index)`` tuples into one batch."""
        longest = max((pixels.shape[0] for pixels, *_ in images), default=0)
        pixels = torch.zeros(len(images), longest, patch_dim, dtype=torch.uint8)
        positions = torch.full((len(images), longest, 2), -1, dtype=torch.long)
        for i, (image_pixels, image_positions, _, _) in enumerate(images):
            pixels[i, : image_pixels.shape[0]] = image_pixels
            positions[i, : image_positions.shape[0]] = image_positions
        token_grids = torch.tensor([grid for *_, grid, _ in images], dtype=torch.long).view(-1, 2)
        sample_index = torch.tensor([index for *_, index in images], dtype=torch.long)
        return cls(pixels=pixels, positions=positions, token_grids=token_grids, sample_index=sample_index)


    def pin_memory(self) -> ImageBatch:
        return ImageBatch(
            self.pixels.pin_memory(), self.positions.pin_memory(), self.token_grids.pin_memory(), self.sample_index.pin_memory()
        )


@dataclass
class ModelInput:
    """Right-padded token ids ``(B, L)``, their attention mask, labels (IGNORE_INDEX where nothing is
    predicted) and the batch's images in text order."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    images: ImageBatch

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def pin_memory(self) -> ModelInput:
        """Page-locked copies of the tensors, for fast, asynchronous copies to the GPU."""
        return ModelInput(
            self.input_ids.pin_memory(), self.attention_mask.pin_memory(), self.labels.pin_memory(), self.images.pin_memory()
        )
