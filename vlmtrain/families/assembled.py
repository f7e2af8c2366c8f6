"""The default family: models that vlmtrain assembles from parts (a native ViT, SigLIP2, DINOv2 or Gemma 4's
tower; a pooling; a projector; any causal LM), and the base every other family builds on."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vlmtrain.model.description import ModelDescription, Start
from vlmtrain.model.lm import KeyMappings, add_lora, build_lm
from vlmtrain.model.pretrained import pretrained_backbone
from vlmtrain.modeling.backbones import BACKBONES
from vlmtrain.modeling.pooling import build_pooling
from vlmtrain.modeling.projector import build_projector
from vlmtrain.modeling.prompt import FRAMES_AS_IMAGES, FrameLayout
from vlmtrain.modeling.vlm import VisionLanguageModel
from vlmtrain.seeding import mix


class Family:
    """What a model family knows: which models it is (:meth:`concerns`), how to build one from a description and
    read its whole checkpoints (:meth:`build`, :attr:`checkpoint_lms`), how its text holds a video
    (:meth:`frame_layout`), and whether a model can be exported in the family's own checkpoint format
    (:attr:`native_layout`, :meth:`native_mismatch`)."""

    name = "assembled"
    title = "assembled"
    checkpoint_lms: KeyMappings = {}  # model_type of the family's whole checkpoints → where their LM's weights are
    native_layout: Any = None  # the family's own checkpoint format as an export layout (vlmtrain.export.format.Layout)

    def concerns(self, description: ModelDescription) -> bool:
        """Whether ``description`` is a model of this family (its parts are the family's)."""
        return False

    def checkpoint_recipe(self, path: str) -> dict[str, Any]:
        """The recipe values that read the whole checkpoint at ``path`` (its every part), for ``model.checkpoint``."""
        raise NotImplementedError(f"the {self.title} family reads no whole checkpoint")

    def build(
        self,
        description: ModelDescription,
        start: Start,
        tokenizer: PreTrainedTokenizerBase,
        seed: int,
        checkpoint_lms: KeyMappings,
    ) -> VisionLanguageModel:
        """The model ``description`` describes, its weights from ``start`` (``checkpoint_lms``: every family's, an
        LM folder may be any family's whole checkpoint). Each part's random initialisation depends only on
        (seed, part): how another part is built (loaded, partitioned by ZeRO-3, given adapters) cannot change it."""
        geometry = description.geometry()
        vision = description.vision
        torch.manual_seed(mix(seed, 1))
        if start.vision_weights is None:
            backbone = BACKBONES[vision.kind].build(vision.settings, start.vision_checkpointing)
        else:
            backbone = pretrained_backbone(vision.kind, vision.settings, start.vision_weights, start.vision_checkpointing)
        backbone.bins = tuple(level * geometry.pool**2 for level in geometry.levels)  # images of a level run together
        if start.vision_lora is not None:
            backbone = add_lora(backbone, start.vision_lora, "model.vision.lora", task_type=None)
        torch.manual_seed(mix(seed, 2))
        pooling = build_pooling(description.pooling.kind, geometry.pool, backbone.width, description.pooling.heads)
        torch.manual_seed(mix(seed, 3))
        lm = build_lm(start.lm, tokenizer, checkpoint_lms)
        lm_width = lm.get_input_embeddings().embedding_dim
        torch.manual_seed(mix(seed, 4))
        projector = build_projector(description.projector.kind, backbone.width, description.projector.hidden_size, lm_width)
        if start.projector_lora is not None:
            projector = add_lora(projector, start.projector_lora, "model.projector.lora", task_type=None)
        image_token_id = tokenizer.convert_tokens_to_ids(description.lm.image_token)
        video_token = self.frame_layout(description, tokenizer).token
        video_token_id = None if video_token is None else tokenizer.convert_tokens_to_ids(video_token)
        return VisionLanguageModel(
            backbone, pooling, projector, lm, image_token_id, geometry, start.lm.loss_chunk_tokens, video_token_id
        )

    def frame_layout(self, description: ModelDescription, tokenizer: PreTrainedTokenizerBase) -> FrameLayout:
        """How the family's text holds a video (:class:`FrameLayout`): assembled models write each frame as an image
        after its ``mm:ss`` time, frames joined by a space (Gemma 4's layout, with the image token)."""
        return FRAMES_AS_IMAGES

    def native_mismatch(
        self, description: dict[str, Any], lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
    ) -> str | None:
        """Why the described model (with its merged ``lm`` and ``tokenizer``) cannot be written as the family's
        own checkpoint, in a few words; None when it can."""
        return f"the {self.title} family has no native checkpoint format"


ASSEMBLED = Family()
