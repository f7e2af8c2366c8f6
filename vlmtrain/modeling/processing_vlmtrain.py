"""The processor of a vlmtrain model (shipped in every export; imports torch, transformers and PIL only).

A prompt with ``<image>`` markers and its images → the model's inputs: each image resized and cut into
patches at its own budget (``budget``: one for all, or one per image; a budget is a cap on its visual
tokens), each marker expanded to as many image tokens, by vlmtrain's own code shipped beside this file."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import BatchFeature, PreTrainedTokenizerBase, ProcessorMixin

from .geometry import Geometry
from .inputs import ImageBatch
from .prompt import prompt_ids


class VlmtrainProcessor(ProcessorMixin):
    """Prompt and images → ``input_ids``, ``attention_mask`` and the images' patches, positions and grids."""

    attributes = ["tokenizer"]
    tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        patch_size: int = 16,
        pool: int = 1,
        levels: Sequence[int] = (70, 140, 280, 560, 1120),
        default_budget: int = 280,
        image_token: str = "<image>",
        chat_template: str | None = None,
        rule: str = "fill",
        min_pixels: int = 0,
        frames: int = 1,
    ) -> None:
        super().__init__(tokenizer, chat_template=chat_template)
        self.patch_size, self.pool, self.levels, self.rule, self.min_pixels = patch_size, pool, list(levels), rule, min_pixels
        self.frames = frames
        self.geometry = Geometry(patch_size, pool, tuple(levels), rule, min_pixels, frames)
        self.default_budget = default_budget
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    def __call__(
        self,
        text: str,
        images: Sequence[Image.Image] = (),
        budget: int | Sequence[int] | None = None,
        return_tensors: str = "pt",
    ) -> BatchFeature:
        """One prompt and its images (several markers place them one for one; one marker stands for all)."""
        batch = ImageBatch.of_images(images, self.default_budget if budget is None else budget, self.geometry)
        ids = prompt_ids(self.tokenizer, text, self.image_token, self.image_token_id, batch.token_counts.tolist())
        input_ids = torch.tensor([ids])
        features: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if batch.count:
            features |= {
                "pixel_values": batch.pixels,
                "pixel_positions": batch.positions,
                "patch_grids": batch.patch_grids,
                "token_grids": batch.token_grids,
                "image_sample_index": batch.sample_index,
            }
        return BatchFeature(features, tensor_type=return_tensors)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)
