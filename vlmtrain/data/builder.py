"""Turning raw samples into a batch at one budget: decode, resize and patchify each image at the size the
geometry gives, expand the prompt's image markers to the same token counts, and pad."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmtrain.data.batch import Batch, ImageBatch, pad_text
from vlmtrain.data.images import decode_image, patch_positions, patchify
from vlmtrain.data.samples import RawSample, SampleError
from vlmtrain.geometry import Geometry
from vlmtrain.text import EncodedText, TextEncoder, TextError


@dataclass(frozen=True)
class SampleFormat:
    """Which JSON fields hold the prompt, the target and (optionally) an evaluation group."""

    prompt: str
    target_field: str
    prompt_field: str | None = None
    group_field: str | None = None


@dataclass
class EncodedSample:
    """One sample ready for collation: its text and, per image, (patches, positions, token grid)."""

    key: str
    text: EncodedText
    images: list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]
    group: str


class BatchBuilder:
    """Encodes raw samples at a budget and collates them into a :class:`Batch`.

    ``fast_decode`` lets JPEGs decode at reduced scale when the budget needs far fewer pixels than stored.
    """

    def __init__(
        self, geometry: Geometry, text: TextEncoder, sample_format: SampleFormat, max_image_pixels: int, fast_decode: bool = True
    ) -> None:
        self.geometry = geometry
        self.text = text
        self.format = sample_format
        self.max_image_pixels = max_image_pixels
        self.fast_decode = fast_decode

    def token_grids(self, sample: RawSample, budget: int) -> tuple[tuple[int, int], ...]:
        """The token grid of each image at ``budget``, from the stored sizes (no decoding): the sample's bucket."""
        return tuple(self.geometry.image(height, width, budget).token_grid for height, width in sample.sizes)

    def visual_tokens(self, sample: RawSample, budget: int) -> int:
        """Visual tokens the sample's images take at ``budget``, from the stored sizes (no decoding)."""
        return sum(self.geometry.image(height, width, budget).tokens for height, width in sample.sizes)

    def _prompt_and_target(self, sample: RawSample) -> tuple[str, str]:
        prompt = sample.text(self.format.prompt_field) if self.format.prompt_field else self.format.prompt
        return prompt, sample.text(self.format.target_field)

    def _encode_text(self, sample: RawSample, image_tokens: list[int]) -> EncodedText:
        try:
            return self.text.encode(*self._prompt_and_target(sample), image_tokens)
        except TextError as error:
            raise SampleError("text", f"sample {sample.key!r}: {error}") from None

    def text_tokens(self, sample: RawSample) -> int:
        """Tokens of the sample's text without its image placeholders; raises SampleError if unusable."""
        return len(self._encode_text(sample, [0] * len(sample.images)).input_ids)

    def encode(self, sample: RawSample, budget: int) -> EncodedSample:
        """Decode and encode one sample; raises :class:`SampleError` for anything unusable."""
        images = []
        for data, (height, width) in zip(sample.images, sample.sizes):
            geometry = self.geometry.image(height, width, budget)
            try:
                image = decode_image(data, self.max_image_pixels, (height, width), geometry.resize if self.fast_decode else None)
            except SampleError as error:
                raise SampleError(error.kind, f"sample {sample.key!r}: {error}") from None
            images.append((patchify(image, geometry, self.geometry.patch_size), patch_positions(geometry), geometry.token_grid))
        text = self._encode_text(sample, [grid[0] * grid[1] for *_, grid in images])
        group = str(sample.record.get(self.format.group_field, "")) if self.format.group_field else ""
        return EncodedSample(key=sample.key, text=text, images=images, group=group)

    def collate(self, samples: list[EncodedSample], budget: int, step: int) -> Batch:
        """Pad encoded samples (all at ``budget``) into one batch."""
        input_ids, attention_mask, labels = pad_text(
            [s.text.input_ids for s in samples], [s.text.labels for s in samples], self.text.pad_token_id
        )
        images = [(pixels, positions, grid, index) for index, s in enumerate(samples) for pixels, positions, grid in s.images]
        return Batch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            images=ImageBatch.stack(images, patch_dim=3 * self.geometry.patch_size**2),
            budget=budget,
            step=step,
            keys=[s.key for s in samples],
            groups=[s.group for s in samples],
        )
