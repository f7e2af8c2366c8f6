"""Turning raw samples into a batch at one budget: decode, resize and patchify each image at the size the
geometry gives, expand the prompt's image markers to the same token counts, and pad."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmtrain.budget import step_cost
from vlmtrain.config import DecodingConfig, TextConfig
from vlmtrain.data.batch import Batch, pad_text
from vlmtrain.data.images import decode_image, image_patches
from vlmtrain.data.samples import RawSample, SampleError
from vlmtrain.geometry import Geometry
from vlmtrain.model.inputs import ImageBatch, ModelInput
from vlmtrain.text import EncodedText, TextEncoder, TextError


@dataclass
class EncodedSample:
    """One sample ready for collation: its text and, per image, (patches, positions, token grid)."""

    key: str
    text: EncodedText
    images: list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]
    group: str


class BatchBuilder:
    """Encodes raw samples at a budget (the record fields and limits of ``fields``, the decoding settings of
    ``decoding``) and collates them into a :class:`Batch`."""

    def __init__(self, geometry: Geometry, text: TextEncoder, fields: TextConfig, decoding: DecodingConfig) -> None:
        self.geometry = geometry
        self.text = text
        self.fields = fields
        self.decoding = decoding

    def token_grids(self, sample: RawSample, budget: int) -> tuple[tuple[int, int], ...]:
        """The token grid of each image at ``budget``, from the stored sizes (no decoding): the sample's bucket."""
        return tuple(self.geometry.image(height, width, budget).token_grid for height, width in sample.sizes)

    def visual_tokens(self, sample: RawSample, budget: int) -> int:
        """Visual tokens the sample's images take at ``budget``, from the stored sizes (no decoding)."""
        return sum(self.geometry.image(height, width, budget).tokens for height, width in sample.sizes)

    def cost(self, sample: RawSample, text_tokens: int, budgets: tuple[int, ...]) -> int:
        """LM tokens the sample takes in a step at ``budgets`` (:func:`~vlmtrain.budget.step_cost`)."""
        return step_cost(lambda budget: self.visual_tokens(sample, budget), text_tokens, budgets)

    def _prompt_and_target(self, sample: RawSample) -> tuple[str, str]:
        prompt = sample.text(self.fields.prompt_field) if self.fields.prompt_field else self.fields.prompt
        return prompt, sample.text(self.fields.target_field)

    def _encode_text(self, sample: RawSample, image_tokens: list[int]) -> EncodedText:
        try:
            encoded = self.text.encode(*self._prompt_and_target(sample), image_tokens)
        except TextError as error:
            raise SampleError("text", f"sample {sample.key!r}: {error}") from None
        text_length = len(encoded.input_ids) - sum(image_tokens)
        if text_length > self.fields.max_length:
            raise SampleError(
                "text_too_long",
                f"sample {sample.key!r}: text is {text_length} tokens, more than data.text.max_length={self.fields.max_length}",
            )
        return encoded

    def text_tokens(self, sample: RawSample) -> int:
        """Tokens of the sample's text without its image placeholders; raises SampleError if unusable."""
        return len(self._encode_text(sample, [0] * len(sample.images)).input_ids)

    def encode(self, sample: RawSample, budget: int) -> EncodedSample:
        """Decode and encode one sample; raises :class:`SampleError` for anything unusable."""
        images = []
        for data, (height, width) in zip(sample.images, sample.sizes, strict=True):
            geometry = self.geometry.image(height, width, budget)
            try:
                target = geometry.resize if self.decoding.fast else None
                image = decode_image(data, self.decoding.max_image_pixels, (height, width), target)
            except SampleError as error:
                raise SampleError(error.kind, f"sample {sample.key!r}: {error}") from None
            images.append((*image_patches(image, geometry, self.geometry.patch_size), geometry.token_grid))
        text = self._encode_text(sample, [grid[0] * grid[1] for *_, grid in images])
        group = str(sample.record.get(self.fields.group_field, "")) if self.fields.group_field else ""
        return EncodedSample(key=sample.key, text=text, images=images, group=group)

    def collate(self, samples: list[EncodedSample], budget: int) -> Batch:
        """Pad encoded samples (all at ``budget``) into one batch."""
        input_ids, attention_mask, labels = pad_text(
            [s.text.input_ids for s in samples], [s.text.labels for s in samples], self.text.pad_token_id
        )
        images = [(pixels, positions, grid, index) for index, s in enumerate(samples) for pixels, positions, grid in s.images]
        inputs = ModelInput(
            input_ids, attention_mask, labels, ImageBatch.stack(images, patch_dim=3 * self.geometry.patch_size**2)
        )
        return Batch(inputs=inputs, budget=budget, keys=[s.key for s in samples], groups=[s.group for s in samples])
