"""The vision-language model: encoder → pooling → projector, spliced into the LM's input embeddings."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from vlmtrain.geometry import Geometry
from vlmtrain.model.backbone import VisionBackbone
from vlmtrain.model.inputs import ImageBatch, ModelInput
from vlmtrain.model.lm import base_model
from vlmtrain.model.pooling import GeometryMismatch, Pooling
from vlmtrain.model.projector import Projector
from vlmtrain.text.tokenizers import IGNORE_INDEX


@dataclass
class SampleLosses:
    """Per sample: summed target-token loss, number of target tokens, and how many of them the model's
    most likely next token got right (teacher forcing)."""

    loss_sum: torch.Tensor
    tokens: torch.Tensor
    correct: torch.Tensor

    def mean(self) -> torch.Tensor:
        """Mean loss over all target tokens of the batch."""
        return self.loss_sum.sum() / self.tokens.sum().clamp(min=1)


def check_placeholders(input_ids: torch.Tensor, image_token_id: int, images: ImageBatch) -> torch.Tensor:
    """The placeholder mask of ``input_ids``; raises :class:`GeometryMismatch` unless every sample holds
    exactly as many placeholders as its images have visual tokens."""
    placeholders = input_ids == image_token_id
    found = placeholders.sum(dim=1)
    expected = torch.zeros_like(found).index_add_(0, images.sample_index, images.token_counts)
    if bool((found != expected).any()):
        raise GeometryMismatch(f"image placeholders per sample {found.tolist()} != visual tokens per sample {expected.tolist()}")
    return placeholders


class VisionLanguageModel(nn.Module):
    """Composes a vision backbone, a pooling, a projector and a causal LM around one :class:`Geometry`."""

    def __init__(
        self,
        backbone: VisionBackbone,
        pooling: Pooling,
        projector: Projector,
        lm: PreTrainedModel,
        image_token_id: int,
        geometry: Geometry,
    ) -> None:
        super().__init__()
        if geometry.patch_size != backbone.patch_size or geometry.pool != pooling.pool:
            raise ValueError(f"geometry {geometry} does not match backbone patch {backbone.patch_size} / pool {pooling.pool}")
        self.backbone = backbone
        self.pooling = pooling
        self.projector = projector
        self.lm = lm
        self.image_token_id = image_token_id
        self.geometry = geometry
        self._lm_keeps_logits = "logits_to_keep" in inspect.signature(base_model(lm).forward).parameters

    def parts(self) -> dict[str, nn.Module]:
        """The four parts, by the names recipes use for freezing and learning rates."""
        return {"vision": self.backbone, "pooling": self.pooling, "projector": self.projector, "lm": self.lm}

    def encode_images(self, images: ImageBatch) -> torch.Tensor:
        """Visual tokens of all images, ``(sum of token counts, lm width)``, image after image, row-major."""
        features = self.backbone(images.pixels, images.positions, images.token_grids * self.geometry.pool)
        tokens, token_mask = self.pooling(features, images.positions, images.token_grids)
        return self.projector(tokens[token_mask])

    def dummy_images(self, device: torch.device) -> ImageBatch:
        """One blank one-token image: run through the vision parts when a batch has no image, so that every
        rank runs the same modules on every step (ZeRO-3 and DDP hang otherwise)."""
        pool, patch = self.geometry.pool, self.geometry.patch_size
        y, x = torch.meshgrid(torch.arange(pool, device=device), torch.arange(pool, device=device), indexing="ij")
        return ImageBatch(
            pixels=torch.zeros(1, pool * pool, 3 * patch * patch, dtype=torch.uint8, device=device),
            positions=torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)[None],
            token_grids=torch.ones(1, 2, dtype=torch.long, device=device),
            sample_index=torch.zeros(1, dtype=torch.long, device=device),
        )

    def embed(self, input_ids: torch.Tensor, images: ImageBatch) -> torch.Tensor:
        """LM input embeddings with each image placeholder replaced by its visual token."""
        placeholders = check_placeholders(input_ids, self.image_token_id, images)
        embeds = self.lm.get_input_embeddings()(input_ids)
        if images.count == 0:
            return embeds + 0.0 * self.encode_images(self.dummy_images(input_ids.device)).sum().to(embeds.dtype)
        visual = self.encode_images(images).to(embeds.dtype)
        return embeds.masked_scatter(placeholders[..., None], visual)

    def forward(self, inputs: ModelInput) -> torch.Tensor:
        """Logits ``(B, L, vocab)`` for the whole sequence."""
        embeds = self.embed(inputs.input_ids, inputs.images)
        return self.lm(inputs_embeds=embeds, attention_mask=inputs.attention_mask, use_cache=False).logits

    def sample_losses(self, inputs: ModelInput) -> SampleLosses:
        """Next-token cross-entropy on target tokens, per sample; logits are computed only where needed."""
        embeds = self.embed(inputs.input_ids, inputs.images)
        targets = inputs.labels[:, 1:]
        predicted = torch.nonzero((targets != IGNORE_INDEX).any(dim=0)).squeeze(1)
        kwargs = {"logits_to_keep": predicted} if self._lm_keeps_logits else {}
        logits = self.lm(inputs_embeds=embeds, attention_mask=inputs.attention_mask, use_cache=False, **kwargs).logits
        if not self._lm_keeps_logits:
            logits = logits[:, predicted]
        labels = targets[:, predicted]
        losses = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        counted = labels != IGNORE_INDEX
        correct = (logits.argmax(dim=-1) == labels) & counted
        return SampleLosses(loss_sum=(losses * counted).sum(dim=1), tokens=counted.sum(dim=1), correct=correct.sum(dim=1))
