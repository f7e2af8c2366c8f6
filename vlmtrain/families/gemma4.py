"""Gemma 4 as a family: a whole Gemma 4 checkpoint read into vlmtrain's parts (its tower, by the tower kind's
prefixes; its multimodal embedder as the ``gemma4`` projector; its text model as the LM), and a model with
Gemma 4's shapes exported as a native Gemma 4 checkpoint: ``Gemma4ForConditionalGeneration`` with Gemma 4's
tokenizer and image processor, no remote code, so whatever serves Gemma 4 serves the model
(``max_soft_tokens`` per image is the budget).

A model has Gemma 4's shapes when its parts are Gemma 4's: the vision tower (backbone ``gemma4``), the
tower's own average pooling, Gemma 4's multimodal embedder as projector (``projector.kind: gemma4``) and a
Gemma 4 text LM, with a tokenizer that declares Gemma 4's image, begin- and end-of-image tokens (training
then writes each image as Gemma 4's processor does, :func:`vlmtrain.modeling.prompt.image_bounds`). Its
weights are then Gemma 4's weights under other names (:data:`NATIVE_NAMES`): the tower's output scaling
and standardisation, applied after pooling by transformers and before it by vlmtrain, are affine and
commute with the average.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import Gemma4Config, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

from vlmtrain.data.config import VideoConfig
from vlmtrain.families.assembled import Family
from vlmtrain.families.native import NativeCheckpoint
from vlmtrain.model.description import ModelDescription, Start
from vlmtrain.model.lm import KeyMappings
from vlmtrain.model.pretrained import load_weights, prefixed_tensors
from vlmtrain.modeling.geometry import LEVELS
from vlmtrain.modeling.prompt import FrameLayout
from vlmtrain.modeling.vlm import VisionLanguageModel

# vlmtrain's names (VisionLanguageModel's state dict, LoRA merged) → Gemma4ForConditionalGeneration's
NATIVE_NAMES = (
    ("backbone.model.", "model.vision_tower."),
    ("projector.", "model.embed_vision."),
    ("lm.model.", "model.language_model."),
    ("lm.lm_head.", "lm_head."),
)
TEXT_MODEL_TYPE = "gemma4_text"
AUDIO_TOKENS = ("audio_token", "boa_token", "eoa_token")

VIDEO_TOKEN = "<|video|>"  # what holds a video frame's place in Gemma 4's text (its processor's video layout)


class Gemma4Layout(NativeCheckpoint):
    """An export as a native Gemma 4 checkpoint at the folder's root."""

    name = "gemma4"
    title = "Gemma 4"
    summary = "a native Gemma 4 checkpoint (Gemma4ForConditionalGeneration and Gemma4Processor, no remote code)"
    card_summary = "- the folder is a native Gemma 4 checkpoint (`Gemma4ForConditionalGeneration`, `Gemma4Processor`)"
    budget_name = "`max_soft_tokens`"
    names = NATIVE_NAMES

    def config(self, description: ModelDescription, lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Gemma4Config:
        return gemma4_config(description, lm, tokenizer)

    def processor_files(
        self, description: ModelDescription, model: VisionLanguageModel, video: VideoConfig
    ) -> dict[str, dict[str, Any]]:
        return {"processor_config.json": processor_config(description, model.geometry.patch_size, video)}

    def budget_kwargs(self, budget: int) -> str:
        return f'{{"max_soft_tokens": {budget}}}'


class Gemma4Family(Family):
    """Every model with Gemma 4's vision tower: built as assembled models are, with the embedder of the
    checkpoint the tower comes from; exported natively when all its parts are Gemma 4's."""

    name = "gemma4"
    title = "Gemma 4"
    checkpoint_lms = {"gemma4": {r"^model\.language_model\.": "model."}}
    native_layout = Gemma4Layout()

    def concerns(self, description: ModelDescription) -> bool:
        return description.vision.kind == "gemma4"

    def checkpoint_recipe(self, path: str) -> dict[str, Any]:
        image = "<|image|>"
        return {
            "model": {
                "vision": {"backbone": "gemma4", "path": path, "patch_size": None},
                "pooling": {"kind": "average", "size": None},
                "projector": {"kind": "gemma4"},
                "lm": {"path": path, "hf_config": None, "image_token": image},
            },
            "data": {"text": {"prompt": image}},
        }

    def frame_layout(self, description: ModelDescription, tokenizer: PreTrainedTokenizerBase) -> FrameLayout:
        """Gemma 4's processor's layout: each frame after its ``mm:ss`` time, frames joined by a space, each frame's
        tokens Gemma 4's video token (its image token where the tokenizer lacks it)."""
        return FrameLayout(token=VIDEO_TOKEN if VIDEO_TOKEN in tokenizer.get_vocab() else None)

    def build(
        self,
        description: ModelDescription,
        start: Start,
        tokenizer: PreTrainedTokenizerBase,
        seed: int,
        checkpoint_lms: KeyMappings,
    ) -> VisionLanguageModel:
        model = super().build(description, start, tokenizer, seed, checkpoint_lms)
        if description.projector.kind == "gemma4" and start.vision_weights is not None:
            load_embedder(model.projector, start.vision_weights)  # a Gemma 4 checkpoint's tower comes with it
        return model

    def native_mismatch(
        self, description: ModelDescription, lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
    ) -> str | None:
        """Why the described model (with its merged ``lm`` and ``tokenizer``) cannot be a native Gemma 4
        checkpoint, in a few words; None when it can."""
        vision, pooling, projector = description.vision, description.pooling, description.projector
        image_token = description.lm.image_token
        own_pool = vision.settings.get("pooling_kernel_size")
        checks = (
            (vision.kind == "gemma4", f"model.vision.backbone is {vision.kind}, not gemma4"),
            (pooling.kind == "average", f"model.pooling.kind is {pooling.kind}, not average"),
            (pooling.size == own_pool, f"model.pooling.size is {pooling.size}, the tower pools {own_pool}x{own_pool}"),
            (projector.kind == "gemma4", f"model.projector.kind is {projector.kind}, not gemma4"),
            (lm.config.model_type == TEXT_MODEL_TYPE, f"the language model is {lm.config.model_type}, not {TEXT_MODEL_TYPE}"),
            (set(description.levels) <= set(LEVELS), f"levels {description.levels} are not all Gemma 4's"),
            (
                getattr(tokenizer, "image_token", None) == image_token and all(
                    getattr(tokenizer, name, None) for name in ("boi_token", "eoi_token")
                ),
                f"the tokenizer does not declare {image_token!r} as its image_token with a boi_token and eoi_token",
            ),
            (  # Gemma4Processor refuses every call without them (transformers 5.24), images or not
                all(getattr(tokenizer, name, None) for name in AUDIO_TOKENS),
                f"the tokenizer does not declare Gemma 4's {', '.join(AUDIO_TOKENS)}, which Gemma4Processor needs",
            ),
            (getattr(lm.config, "use_bidirectional_attention", None) != "all", "the LM attends bidirectionally everywhere"),
        )
        return next((reason for ok, reason in checks if not ok), None)


EMBEDDER_PREFIXES = ("model.embed_vision.", "embed_vision.")


def load_embedder(projector: torch.nn.Module, path: str) -> None:
    """Load Gemma 4's multimodal embedder into a ``gemma4`` projector from the whole Gemma 4 checkpoint at
    ``path`` (the one its tower comes from); nothing when the folder holds none (a vision-only folder)."""
    try:
        state = prefixed_tensors(Path(path), EMBEDDER_PREFIXES)
    except ValueError:  # no weights under those prefixes
        return
    load_weights(projector, state)


def gemma4_config(description: ModelDescription, lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Gemma4Config:
    """The checkpoint's config: the tower's and the LM's own, the tokenizer's image token ids. An LM that
    attends bidirectionally within images when served ("vision") was trained attending causally (vlmtrain
    runs the text model alone): the config says what it was trained to compute. The default budget is the
    vision config's ``default_output_length`` (vLLM's name for it)."""
    text_config = lm.config.to_dict()
    if text_config.get("use_bidirectional_attention") == "vision":
        text_config["use_bidirectional_attention"] = None
    ids = {name: tokenizer.convert_tokens_to_ids(getattr(tokenizer, name)) for name in ("image_token", "boi_token", "eoi_token")}
    video = {"video_token_id": tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)} if VIDEO_TOKEN in tokenizer.get_vocab() else {}
    config = Gemma4Config(
        text_config=text_config,
        # default_output_length: what vLLM reads as the budget of a request that names none (it fails to start
        # without it); the processor's default (max_soft_tokens, image_seq_length) is the same budget
        vision_config={
            **description.vision.settings, "model_type": "gemma4_vision", "default_output_length": description.default_budget
        },
        audio_config=None,
        image_token_id=ids["image_token"],
        boi_token_id=ids["boi_token"],
        eoi_token_id=ids["eoi_token"],
        tie_word_embeddings=lm.config.tie_word_embeddings,
        **video,
    )
    config.architectures = ["Gemma4ForConditionalGeneration"]
    config.dtype = lm.config.dtype
    return config


def processor_config(description: ModelDescription, patch_size: int, video: VideoConfig) -> dict[str, Any]:
    """``processor_config.json`` of Gemma 4's processor: the image processor at the model's patch size and
    pool, ``max_soft_tokens`` its default budget (any of its levels per call: ``images_kwargs``); the video
    processor the same at the video budget, sampling ``video.fps`` frames a second as training did (its
    ``num_frames`` null: given a number it takes that many frames whatever the video's length, so a video longer
    than ``max_frames`` / ``fps`` seconds trains on what it samples with ``num_frames=max_frames``)."""
    budget, pool = description.default_budget, description.pooling.size
    image_processor = Gemma4ImageProcessorPil(patch_size=patch_size, pooling_kernel_size=pool, max_soft_tokens=budget)
    image_processor = json.loads(image_processor.to_json_string())
    image_processor["image_processor_type"] = "Gemma4ImageProcessor"  # transformers picks the backend it has
    return {
        "processor_class": "Gemma4Processor",
        "image_seq_length": budget,
        "image_processor": image_processor,
        "feature_extractor": json.loads(Gemma4AudioFeatureExtractor().to_json_string()),
        "video_processor": {
            "video_processor_type": "Gemma4VideoProcessor", "patch_size": patch_size, "pooling_kernel_size": pool,
            "max_soft_tokens": video.budget, "do_sample_frames": True, "fps": video.fps, "num_frames": None,
        },
    }


GEMMA4 = Gemma4Family()
