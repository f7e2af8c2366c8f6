"""Turning raw samples into a batch at one budget: decode, resize and patchify each image at the size the
geometry gives, expand the prompt's image markers to the same token counts, and pad."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from vlmtrain.budget import step_cost
from vlmtrain.data.batch import Batch, pack_text, pad_text
from vlmtrain.data.config import DecodingConfig, TextConfig, VideoConfig
from vlmtrain.data.images import decode_image
from vlmtrain.data.samples import RawSample, SampleError
from vlmtrain.data.video import decoded_images, placeholder_kinds
from vlmtrain.modeling.geometry import Geometry, ImageGeometry, ImageSizeError
from vlmtrain.modeling.inputs import ImageBatch, ModelInput
from vlmtrain.modeling.pixels import image_patches
from vlmtrain.modeling.prompt import FRAMES_AS_IMAGES, OPENS, FrameLayout
from vlmtrain.text.chat import ChatTemplateError
from vlmtrain.text.conversation import image_count, text_of
from vlmtrain.text.encoding import EncodedText, TextEncoder, TextError


@dataclass
class EncodedSample:
    """One sample ready for collation: its text and, per image, (patches, positions, geometry), budget and M-RoPE
    time in its video's block (:data:`~vlmtrain.modeling.prompt.OPENS` for an image)."""

    key: str
    text: EncodedText
    images: list[tuple[torch.Tensor, torch.Tensor, ImageGeometry]]
    group: str
    budgets: tuple[int, ...] = ()
    token_times: tuple[int, ...] = ()


Budgets = int | Sequence[int]  # one budget for every image of a sample, or one per image


def per_image(sample: RawSample, budgets: Budgets) -> tuple[int, ...]:
    """One budget per image of ``sample``."""
    found = (budgets,) * len(sample.sizes) if isinstance(budgets, int) else tuple(budgets)
    if len(found) != len(sample.sizes):
        raise ValueError(f"{len(found)} budgets for the {len(sample.sizes)} images of {sample.key!r}")
    return found


@dataclass(frozen=True)
class Question:
    """What a model is asked in evaluation: the prompt's token ids (with the placeholders of the sample's
    first ``images`` images), the expected answer, and whether it is a chat turn (generation then stops at
    the template's end of turn)."""

    prompt_ids: list[int]
    images: int
    target: str
    chat: bool


class BatchBuilder:
    """Encodes raw samples at given budgets (the record fields and limits of ``fields``, the decoding
    settings of ``decoding``; ``video``: how the streams that feed it sample a video's frames) and collates them
    into a :class:`Batch`."""

    def __init__(
        self,
        geometry: Geometry,
        text: TextEncoder,
        fields: TextConfig,
        decoding: DecodingConfig,
        video: VideoConfig | None = None,
        frame_layout: FrameLayout = FRAMES_AS_IMAGES,
    ) -> None:
        self.geometry = geometry
        self.text = text
        self.fields = fields
        self.decoding = decoding
        self.video = video or VideoConfig()
        self.frame_layout = frame_layout  # how the model's family writes a video's frames (:func:`with_frames`)

    def image_geometries(self, sample: RawSample, budgets: Budgets) -> list[ImageGeometry]:
        """Each image's geometry at its budget, from the stored sizes (no decoding); an image the geometry cannot
        serve makes the sample unusable (:class:`SampleError` of kind ``image_size``)."""
        try:
            return [self.geometry.image(h, w, b) for (h, w), b in zip(sample.sizes, per_image(sample, budgets), strict=True)]
        except ImageSizeError as error:
            raise SampleError("image_size", f"sample {sample.key!r}: {error}") from None

    def token_grids(self, sample: RawSample, budgets: Budgets) -> tuple[tuple[int, int], ...]:
        """The token grid of each image at its budget: the sample's bucket."""
        return tuple(geometry.token_grid for geometry in self.image_geometries(sample, budgets))

    def visual_tokens(self, sample: RawSample, budgets: Budgets) -> int:
        """Visual tokens the sample's images take at their budgets."""
        return sum(geometry.tokens for geometry in self.image_geometries(sample, budgets))

    def cost(self, sample: RawSample, text_tokens: int, budgets: Sequence[Budgets]) -> int:
        """LM tokens the sample takes in a step whose batches put its images at ``budgets`` (one entry per
        batch; :func:`~vlmtrain.budget.step_cost`)."""
        return step_cost(lambda batch_budgets: self.visual_tokens(sample, batch_budgets), text_tokens, budgets)

    def _prompt_and_target(self, sample: RawSample) -> tuple[str, str]:
        prompt = sample.text(self.fields.prompt_field) if self.fields.prompt_field else self.fields.prompt
        target = sample.text(self.fields.target_field)
        if not target.strip():
            raise SampleError("empty_target", f"sample {sample.key!r}: {self.fields.target_field!r} is empty, nothing to learn")
        return prompt, target

    def _encode_text(self, sample: RawSample, image_tokens: list[int]) -> EncodedText:
        """A conversation record through the chat template, a prompt/target record as written."""
        try:
            if sample.messages is not None:
                kinds = placeholder_kinds(sample)
                encoded = self.text.encode_chat(sample.messages, image_tokens, self.fields.train_on, kinds)
            else:
                encoded = self.text.encode(*self._prompt_and_target(sample), image_tokens)
        except TextError as error:
            raise SampleError("text", f"sample {sample.key!r}: {error}") from None
        except ChatTemplateError as error:
            raise SampleError("chat_template", f"sample {sample.key!r}: {error}") from None
        text_length = len(encoded.input_ids) - sum(image_tokens)
        if text_length > self.fields.max_length:
            raise SampleError(
                "text_too_long",
                f"sample {sample.key!r}: text is {text_length} tokens, more than data.text.max_length={self.fields.max_length}",
            )
        return encoded

    def questions(self, sample: RawSample, encoded: EncodedSample) -> list[Question]:
        """The questions a sample asks: its prompt and target, or each assistant turn of its conversation
        (everything before the turn is the prompt)."""
        counts = [geometry.tokens for *_, geometry in encoded.images]
        if sample.messages is None:
            prompt, target = self._prompt_and_target(sample)
            return [Question(self.text.encode_prompt(prompt, counts), len(counts), target, chat=False)]
        questions, kinds = [], placeholder_kinds(sample)
        for index, message in enumerate(sample.messages):
            if message["role"] == "assistant":
                before = sample.messages[:index]
                images = image_count(before)
                prompt = self.text.encode_chat_prompt(before, counts[:images], kinds[:images])
                questions.append(Question(prompt, images, text_of(message), chat=True))
        return questions

    def text_tokens(self, sample: RawSample) -> int:
        """Tokens of the sample's text without its image placeholders; raises SampleError if unusable."""
        return len(self._encode_text(sample, [0] * len(sample.images)).input_ids)

    def encode(self, sample: RawSample, budgets: Budgets) -> EncodedSample:
        """Decode and encode one sample, its images at ``budgets``; raises :class:`SampleError` for anything
        unusable."""
        budgets = per_image(sample, budgets)
        geometries = self.image_geometries(sample, budgets)

        def decode(data: bytes, index: int) -> Image.Image:
            target = geometries[index].resize if self.decoding.fast else None
            return decode_image(data, self.decoding.max_image_pixels, sample.sizes[index], target)

        try:
            decoded = decoded_images(sample.images, [geometry.resize for geometry in geometries], decode)
        except SampleError as error:
            raise SampleError(error.kind, f"sample {sample.key!r}: {error}") from None
        patch, frames = self.geometry.patch_size, self.geometry.frames
        pairs = zip(decoded, geometries, strict=True)
        images = [(*image_patches(image, geometry, patch, frames), geometry) for image, geometry in pairs]
        text = self._encode_text(sample, [geometry.tokens for *_, geometry in images])
        group = str(sample.record.get(self.fields.group_field, "")) if self.fields.group_field else ""
        times = tuple(sample.token_times) or (OPENS,) * len(images)
        return EncodedSample(key=sample.key, text=text, images=images, group=group, budgets=budgets, token_times=times)

    def collate(
        self, samples: list[EncodedSample], budget: int | None, packed: bool = True, row_tokens: int | None = None
    ) -> Batch:
        """Encoded samples as one batch at ``budget`` (None: its images at budgets of their own): their text in
        packed rows (:func:`~vlmtrain.data.batch.pack_text`) or, with ``packed=False``, one padded row each;
        their images packed either way."""
        sequences, labels = [s.text.input_ids for s in samples], [s.text.labels for s in samples]
        images = ImageBatch.stack(
            [(pixels, positions, geometry, index) for index, s in enumerate(samples) for pixels, positions, geometry in s.images],
            patch_dim=self.geometry.patch_dim,
            token_times=[time for s in samples for time in s.token_times],
        )
        if packed:
            input_ids, position_ids, sequence_ids, label_tensor, cu_seqlens = pack_text(
                sequences, labels, self.text.pad_token_id, row_tokens
            )
            inputs = ModelInput(
                input_ids,
                None,
                label_tensor,
                images,
                position_ids,
                sequence_ids,
                len(samples),
                cu_seqlens,
                int(cu_seqlens.diff().max()),
            )
        else:
            input_ids, attention_mask, label_tensor = pad_text(sequences, labels, self.text.pad_token_id)
            inputs = ModelInput(input_ids, attention_mask, label_tensor, images)
        return Batch(
            inputs=inputs,
            budget=budget,
            keys=[s.key for s in samples],
            groups=[s.group for s in samples],
            image_budgets=[b for s in samples for b in s.budgets],
            tokens=sum(len(ids) for ids in sequences),
            grids=[geometry.token_grid for s in samples for *_, geometry in s.images],
        )
