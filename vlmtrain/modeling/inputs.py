"""The model's input: the token ids of a batch with their labels, and its images cut into patches.

The data pipeline builds these (:mod:`vlmtrain.data`), the model consumes them; nothing else rides along.
Images are always packed: their patches one image after another, nothing padded. Text is either padded
rows (one sample per row, an attention mask) or packed rows (several samples per row, position ids that
restart at every sample, the sample each token belongs to).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from PIL import Image

from .geometry import Geometry, ImageGeometry
from .pixels import image_patches, to_rgb


@dataclass
class ImageBatch:
    """All images of a batch, in text order, their patches packed one image after another.

    ``pixels``: ``(P, frames*patch*patch*3)`` uint8, every image's patches row-major (``frames``: the
    geometry's); ``positions``: ``(P, 2)`` each patch's (x, y) in its image; ``patch_grids`` and
    ``token_grids``: ``(I, 2)`` (rows, cols) of each image's patches and of the visual tokens the geometry
    promised; ``sample_index``: ``(I,)`` each image's sample; ``token_times``: ``(I,)`` the M-RoPE time of each
    in the vision block the previous one opened (Qwen2.5-VL's joined video units), -1 where it opens its own
    (None: every one does).
    """

    pixels: torch.Tensor
    positions: torch.Tensor
    patch_grids: torch.Tensor
    token_grids: torch.Tensor
    sample_index: torch.Tensor
    token_times: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return self.patch_grids.shape[0]

    @property
    def token_counts(self) -> torch.Tensor:
        return self.token_grids[:, 0] * self.token_grids[:, 1]

    @property
    def patch_counts(self) -> torch.Tensor:
        return self.patch_grids[:, 0] * self.patch_grids[:, 1]

    @classmethod
    def stack(
        cls,
        images: list[tuple[torch.Tensor, torch.Tensor, ImageGeometry, int]],
        patch_dim: int,
        token_times: Sequence[int] | None = None,
    ) -> ImageBatch:
        """Pack ``(patches, positions, geometry, sample_index)`` tuples, image after image (``token_times``: each
        one's, kept where one continues a block)."""
        joined = token_times is not None and any(time >= 0 for time in token_times)
        times = torch.tensor(list(token_times), dtype=torch.long) if joined else None
        return cls(
            pixels=torch.cat([pixels for pixels, *_ in images]) if images else torch.zeros(0, patch_dim, dtype=torch.uint8),
            positions=torch.cat([positions for _, positions, *_ in images]) if images else torch.zeros(0, 2, dtype=torch.long),
            patch_grids=torch.tensor([geometry.patch_grid for *_, geometry, _ in images], dtype=torch.long).view(-1, 2),
            token_grids=torch.tensor([geometry.token_grid for *_, geometry, _ in images], dtype=torch.long).view(-1, 2),
            sample_index=torch.tensor([index for *_, index in images], dtype=torch.long),
            token_times=times,
        )

    @classmethod
    def of_images(
        cls,
        images: Sequence[Image.Image | Sequence[Image.Image]],
        budget: int | Sequence[int],
        geometry: Geometry,
        samples: Sequence[int] | None = None,
        token_times: Sequence[int] | None = None,
    ) -> ImageBatch:
        """PIL images as the model takes them, each at ``budget`` (one for all, or one per image), of sample
        ``samples[i]`` (default 0): what inference and every exported processor feed the model. An image may be
        a video's frames that share one patch (a sequence of up to ``geometry.frames``: :func:`image_patches`),
        at its ``token_times`` within its video's block."""
        budgets = [budget] * len(images) if isinstance(budget, int) else list(budget)
        if len(budgets) != len(images):
            raise ValueError(f"{len(budgets)} budgets for {len(images)} images")
        items = []
        for image, image_budget, sample in zip(images, budgets, samples or [0] * len(images), strict=True):
            frames = [to_rgb(frame) for frame in ([image] if isinstance(image, Image.Image) else image)]
            shape = geometry.image(frames[0].height, frames[0].width, image_budget)
            items.append((*image_patches(frames, shape, geometry.patch_size, geometry.frames), shape, sample))
        return cls.stack(items, patch_dim=geometry.patch_dim, token_times=token_times)

    def select(self, chosen: list[int]) -> ImageBatch:
        """Images ``chosen`` (indices, in this order) as a batch of their own, their sample index kept."""
        offsets = [0, *torch.cumsum(self.patch_counts, 0).tolist()]
        device = self.pixels.device
        rows = torch.cat(
            [torch.arange(offsets[i], offsets[i + 1], device=device) for i in chosen]
            + [torch.zeros(0, dtype=torch.long, device=device)]
        )
        index = torch.tensor(chosen, dtype=torch.long, device=device)
        times = None if self.token_times is None else self.token_times[index]
        return ImageBatch(
            self.pixels[rows], self.positions[rows], self.patch_grids[index], self.token_grids[index], self.sample_index[index],
            times,
        )

    def pin_memory(self) -> ImageBatch:
        return ImageBatch(*(None if (value := getattr(self, f.name)) is None else value.pin_memory() for f in fields(self)))

    def to(self, device: torch.device | str) -> ImageBatch:
        return ImageBatch(*(None if (value := getattr(self, f.name)) is None else value.to(device) for f in fields(self)))


@dataclass
class ModelInput:
    """Token ids ``(R, L)`` with their labels (IGNORE_INDEX where nothing is predicted) and the batch's images.

    Padded rows (one sample each): ``attention_mask`` marks the real tokens. Packed rows (several samples
    each, no attention mask): ``position_ids`` restart at 0 at every sample, ``cu_seqlens`` (offsets of the
    sequences in the flattened rows) and ``max_seqlen`` keep attention inside each sample (varlen attention;
    transformers' ``sdpa`` builds a block-diagonal mask from the position ids instead), and
    ``sequence_ids`` give each token's sample (-1 on padding after the last one)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    labels: torch.Tensor
    images: ImageBatch
    position_ids: torch.Tensor | None = None
    sequence_ids: torch.Tensor | None = None
    samples: int = 0  # packed rows: how many samples they hold (padded rows: one per row)
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0

    @property
    def packed(self) -> bool:
        return self.sequence_ids is not None

    @property
    def size(self) -> int:
        """The number of samples."""
        return self.samples if self.packed else self.input_ids.shape[0]

    @property
    def sample_ids(self) -> torch.Tensor:
        """The sample of every token, ``(R, L)``: for padded rows the row, -1 on padding (none without a mask)."""
        if self.packed:
            return self.sequence_ids
        rows = torch.arange(self.input_ids.shape[0], device=self.input_ids.device)[:, None].expand_as(self.input_ids)
        return rows if self.attention_mask is None else torch.where(self.attention_mask.bool(), rows, -1)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def pin_memory(self) -> ModelInput:
        """Page-locked copies of the tensors, for fast, asynchronous copies to the GPU."""
        tensors = self._tensors()
        return replace(self, images=self.images.pin_memory(), **{name: value.pin_memory() for name, value in tensors.items()})

    def to(self, device: torch.device | str) -> ModelInput:
        tensors = self._tensors()
        return replace(self, images=self.images.to(device), **{name: value.to(device) for name, value in tensors.items()})

    def attention_kwargs(self) -> dict[str, torch.Tensor | int]:
        """The packed rows' sequence offsets as transformers' varlen attention takes them (none for padded rows)."""
        if self.cu_seqlens is None:
            return {}
        return {
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_seqlen,
            "max_length_k": self.max_seqlen,
        }
