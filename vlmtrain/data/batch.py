"""The batch the model consumes: padded text, padded image patches, and the geometry of every image."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from vlmtrain.text import IGNORE_INDEX


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

    @property
    def padding(self) -> float:
        """Padded visual-token slots ÷ all slots, when every image is padded to the batch's largest."""
        if self.count == 0:
            return 0.0
        counts = self.token_counts
        return 1.0 - float(counts.sum()) / float(counts.max() * self.count)

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


@dataclass
class Batch:
    """One batch at one token budget; ``step`` is its position in the budget schedule (-1 in evaluation).

    Training batches also say where they came from: the data epoch of each sample, the stream that made
    the batch and its state after it (for resume, with the stream's skip counts so far).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    images: ImageBatch
    budget: int
    step: int
    keys: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    stream: int = 0
    stream_state: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def pin_memory(self) -> Batch:
        """Page-locked copies of the tensors, for fast, asynchronous copies to the GPU."""
        images = self.images
        pinned = ImageBatch(images.pixels.pin_memory(), images.positions.pin_memory(), images.token_grids.pin_memory(), images.sample_index.pin_memory())
        return replace(self, input_ids=self.input_ids.pin_memory(), attention_mask=self.attention_mask.pin_memory(), labels=self.labels.pin_memory(), images=pinned)


def pad_text(sequences: list[list[int]], labels: list[list[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-pad token ids (with ``pad_id``) and labels (with IGNORE_INDEX); returns ids, attention mask, labels."""
    length = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    label_tensor = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, row_labels) in enumerate(zip(sequences, labels)):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        label_tensor[row, : len(row_labels)] = torch.tensor(row_labels, dtype=torch.long)
    return input_ids, attention_mask, label_tensor
