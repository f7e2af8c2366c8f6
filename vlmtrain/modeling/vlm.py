"""The vision-language model: encoder → pooling → projector, spliced into the LM's input embeddings."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .backbone import VisionBackbone
from .geometry import Geometry
from .inputs import ImageBatch, ModelInput
from .loss import check_plain_head, chunked_token_losses
from .pooling import GeometryMismatch, Pooling
from .tokenizers import IGNORE_INDEX


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


def check_placeholders(
    placeholders: torch.Tensor, sample_ids: torch.Tensor, samples: int, images: ImageBatch
) -> torch.Tensor:
    """The placeholder mask, checked: raises :class:`GeometryMismatch` unless every sample (``sample_ids`` gives
    each token's) holds exactly as many placeholders as its images have visual tokens."""
    found = torch.bincount(sample_ids[placeholders], minlength=samples)
    expected = torch.zeros_like(found).index_add_(0, images.sample_index, images.token_counts)
    if bool((found != expected).any()):
        raise GeometryMismatch(f"image placeholders per sample {found.tolist()} != visual tokens per sample {expected.tolist()}")
    return placeholders


def row_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """Each token's sample when every row is one sample."""
    return torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(input_ids)


class VisionLanguageModel(nn.Module):
    """Composes a vision backbone, a pooling, a projector and a causal LM around one :class:`Geometry`."""

    def __init__(
        self,
        backbone: VisionBackbone,
        pooling: Pooling,
        projector: nn.Module,
        lm: PreTrainedModel,
        image_token_id: int,
        geometry: Geometry,
        loss_chunk: int = 0,
        video_token_id: int | None = None,
    ) -> None:
        super().__init__()
        if geometry.patch_size != backbone.patch_size or geometry.pool != pooling.pool:
            raise ValueError(f"geometry {geometry} does not match backbone patch {backbone.patch_size} / pool {pooling.pool}")
        self.backbone = backbone
        self.pooling = pooling
        self.projector = projector
        self.lm = lm
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id  # what holds a video frame's place, where the family's layout has its own
        self.geometry = geometry
        transformers_lm = self.transformers_lm()
        self._lm_keeps_logits = "logits_to_keep" in inspect.signature(transformers_lm.forward).parameters
        self.loss_chunk = loss_chunk  # labelled tokens per chunk of the loss (0: all logits at once; see .loss)
        if loss_chunk:
            check_plain_head(transformers_lm.config.model_type)

    def parts(self) -> dict[str, nn.Module]:
        """The four parts, by the names recipes use for freezing and learning rates."""
        return {"vision": self.backbone, "pooling": self.pooling, "projector": self.projector, "lm": self.lm}

    def encode_images(self, images: ImageBatch) -> torch.Tensor:
        """Visual tokens of all images, ``(sum of token counts, lm width)``, image after image, row-major."""
        features = self.backbone(images.pixels, images.positions, images.patch_grids)
        return self.projector(self.pooling(features, images.positions, images.token_grids))

    def visual_parts(self, visual: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """:meth:`encode_images`'s output as the visual tokens' own columns and the features, one block per layer,
        that a tower feeding the LM's first layers gives beside them (none for any other tower)."""
        tokens, *layers = visual.split(visual.shape[-1] // (1 + self.backbone.layer_features), dim=-1)
        return tokens, layers

    def dummy_images(self, device: torch.device) -> ImageBatch:
        """One blank one-token image: run through the vision parts when a batch has no image, so that every
        rank runs the same modules on every step (ZeRO-3 and DDP hang otherwise)."""
        pool = self.geometry.pool
        y, x = torch.meshgrid(torch.arange(pool, device=device), torch.arange(pool, device=device), indexing="ij")
        return ImageBatch(
            pixels=torch.zeros(pool * pool, self.geometry.patch_dim, dtype=torch.uint8, device=device),
            positions=torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1),
            patch_grids=torch.full((1, 2), pool, dtype=torch.long, device=device),
            token_grids=torch.ones(1, 2, dtype=torch.long, device=device),
            sample_index=torch.zeros(1, dtype=torch.long, device=device),
        )

    def embed(
        self,
        input_ids: torch.Tensor,
        images: ImageBatch,
        sample_ids: torch.Tensor | None = None,
        samples: int | None = None,
        visual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | list[torch.Tensor]]]:
        """LM input embeddings with each image placeholder replaced by its visual token (placeholders row-major
        are the images' tokens in order; ``sample_ids`` gives each token's sample, default one per row;
        ``visual``: the images' visual tokens when the caller has them already, :meth:`encode_images`), and what
        else the LM takes of the images: for a tower that feeds the LM's first layers (``layer_features``), where
        the image tokens are and each layer's features (Qwen3-VL's ``visual_pos_masks`` and
        ``deepstack_visual_embeds``); nothing for any other."""
        if sample_ids is None:
            sample_ids, samples = row_ids(input_ids), input_ids.shape[0]
        placeholders = check_placeholders(self.placeholders(input_ids), sample_ids.clamp(min=0), samples, images)
        embeds = self.lm.get_input_embeddings()(input_ids)
        if images.count == 0:
            return embeds + 0.0 * self.encode_images(self.dummy_images(input_ids.device)).sum().to(embeds.dtype), {}
        visual = (self.encode_images(images) if visual is None else visual).to(embeds.dtype)
        tokens, layers = self.visual_parts(visual)
        embeds = embeds.masked_scatter(placeholders[..., None], tokens)
        return embeds, ({"visual_pos_masks": placeholders, "deepstack_visual_embeds": layers} if layers else {})

    def placeholders(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where visual tokens go: the image token, and the video token of a family that writes frames with one."""
        mask = input_ids == self.image_token_id
        return mask if self.video_token_id is None else mask | (input_ids == self.video_token_id)

    def rope_positions(
        self,
        input_ids: torch.Tensor,
        images: ImageBatch,
        positions: torch.Tensor | None = None,
        sample_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """3-D positions for an LM with multimodal RoPE (which says how: ``rope_positions``), None for any other;
        ``positions``/``sample_ids``: the rows' 1-D positions and samples (default: one sample per row, from 0)."""
        rope_positions = getattr(self.transformers_lm(), "rope_positions", None)
        if rope_positions is None:
            return None
        if positions is None:  # rows of one sample each, any padding at the end
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        sample_ids = row_ids(input_ids) if sample_ids is None else sample_ids
        return rope_positions(
            input_ids, positions, sample_ids, self.placeholders(input_ids), images.token_grids, images.token_times
        )

    def lm_inputs(self, inputs: ModelInput) -> dict:
        """What the LM is called with: the embeddings (and what else it takes of the images: :meth:`embed`),
        the mask or sequence offsets, and the positions (3-D for an LM with multimodal RoPE: :meth:`rope_positions`)."""
        position_ids = self.rope_positions(inputs.input_ids, inputs.images, inputs.position_ids, inputs.sample_ids)
        if position_ids is None:
            position_ids = inputs.position_ids
        embeds, visual_inputs = self.embed(inputs.input_ids, inputs.images, inputs.sample_ids, inputs.size)
        return {
            "inputs_embeds": embeds, "attention_mask": inputs.attention_mask, "position_ids": position_ids,
            "use_cache": False, **visual_inputs, **inputs.attention_kwargs(),
        }

    def transformers_lm(self) -> PreTrainedModel:
        """The transformers LM itself (the base model inside a PEFT wrapper)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm  # inside a PEFT wrapper

    def forward(self, inputs: ModelInput) -> torch.Tensor:
        """Logits ``(R, L, vocab)`` for the whole sequence."""
        return self.lm(**self.lm_inputs(inputs)).logits

    def sample_losses(self, inputs: ModelInput) -> SampleLosses:
        """Next-token cross-entropy on target tokens, per sample; logits are computed only where needed (with
        ``loss_chunk``, a chunk of them at a time). In packed rows a sample's last token predicts nothing (the
        next token is another sample's)."""
        owners = inputs.sample_ids
        targets = inputs.labels[:, 1:]
        if inputs.packed:
            targets = targets.masked_fill(owners[:, 1:] != owners[:, :-1], IGNORE_INDEX)
        lm_inputs = self.lm_inputs(inputs)
        counted = targets != IGNORE_INDEX
        if self.loss_chunk:
            transformers_lm = self.transformers_lm()
            hidden = transformers_lm.get_decoder()(**lm_inputs).last_hidden_state[:, :-1][counted]
            softcap = getattr(transformers_lm.config, "final_logit_softcapping", None)
            labels = targets[counted]
            losses, predictions = chunked_token_losses(
                hidden, labels, transformers_lm.get_output_embeddings(), softcap, self.loss_chunk
            )
            owner, correct = owners[:, :-1][counted], predictions == labels
        else:
            predicted = torch.nonzero(counted.any(dim=0)).squeeze(1)
            kwargs = {"logits_to_keep": predicted} if self._lm_keeps_logits else {}
            logits = self.lm(**lm_inputs, **kwargs).logits
            if not self._lm_keeps_logits:
                logits = logits[:, predicted]
            labels = targets[:, predicted]
            kept = counted[:, predicted]
            losses = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")[kept]
            owner = owners[:, :-1][:, predicted][kept]
            correct = ((logits.argmax(dim=-1) == labels) & kept)[kept]
        samples = inputs.size
        return SampleLosses(
            loss_sum=losses.new_zeros(samples).index_add(0, owner, losses),
            tokens=torch.bincount(owner, minlength=samples),
            correct=torch.bincount(owner, weights=correct.float(), minlength=samples).long(),
        )
