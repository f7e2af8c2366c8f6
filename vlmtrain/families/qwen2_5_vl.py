"""The Qwen2.5-VL family: models with Qwen2.5-VL's vision tower (its patch merger included), and whole
Qwen2.5-VL checkpoints, whose language model (``model.language_model.*`` and ``lm_head``) is read as
:class:`~vlmtrain.modeling.qwen_lm.Qwen25VLTextForCausalLM` with its multimodal RoPE positions. Its geometry is
the tower kind's (``smart_resize``, :mod:`vlmtrain.modeling.backbones`).

A model whose parts are all Qwen2.5-VL's (the tower, the ``tower`` pooling and ``identity`` projector, Qwen2.5-VL's
text model, a tokenizer with Qwen's vision tokens) exports as a native Qwen2.5-VL checkpoint:
``Qwen2_5_VLForConditionalGeneration`` with Qwen's image processor, no remote code; the budget is the image
processor's ``max_pixels`` (``size.longest_edge`` = budget × 28²), the default budget its default.
"""

from __future__ import annotations

import json
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase, Qwen2_5_VLConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlmtrain.families.assembled import Family
from vlmtrain.families.native import NativeCheckpoint
from vlmtrain.model.description import ModelDescription
from vlmtrain.modeling.geometry import LEVELS
from vlmtrain.modeling.prompt import QWEN_IMAGE
from vlmtrain.modeling.vlm import VisionLanguageModel

# vlmtrain's names (VisionLanguageModel's state dict, LoRA merged) → Qwen2_5_VLForConditionalGeneration's
NATIVE_NAMES = (
    ("backbone.model.", "model.visual."),
    ("lm.model.", "model.language_model."),
    ("lm.lm_head.", "lm_head."),
)
TEXT_MODEL_TYPE = "qwen2_5_vl_text"


class Qwen25VLLayout(NativeCheckpoint):
    """An export as a native Qwen2.5-VL checkpoint at the folder's root."""

    name = "qwen2_5_vl"
    title = "Qwen2.5-VL"
    summary = "a native Qwen2.5-VL checkpoint (Qwen2_5_VLForConditionalGeneration, Qwen's image processor, no remote code)"
    card_summary = "- the folder is a native Qwen2.5-VL checkpoint (`Qwen2_5_VLForConditionalGeneration`)"
    budget_name = "the image processor's `max_pixels`, budget x 28 x 28"
    names = NATIVE_NAMES

    def config(self, description: ModelDescription, lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Qwen2_5_VLConfig:
        return qwen_config(description, lm, tokenizer)

    def processor_files(self, description: ModelDescription, model: VisionLanguageModel) -> dict[str, dict[str, Any]]:
        cell, min_pixels = model.geometry.cell, model.geometry.min_pixels
        return {"preprocessor_config.json": image_processor_config(cell, min_pixels, description.default_budget)}

    def budget_kwargs(self, budget: int) -> str:
        return f'{{"size": {{"shortest_edge": 3136, "longest_edge": {budget} * 28 * 28}}}}'


class Qwen25VLFamily(Family):
    """Every model with Qwen2.5-VL's vision tower, built as assembled models are; its LM may be a whole Qwen2.5-VL
    checkpoint's; exported natively when all its parts are Qwen2.5-VL's."""

    name = "qwen2_5_vl"
    title = "Qwen2.5-VL"
    checkpoint_lms = {"qwen2_5_vl": {r"^model\.language_model\.": "model."}}
    native_layout = Qwen25VLLayout()

    def concerns(self, description: ModelDescription) -> bool:
        return description.vision.kind == "qwen2_5_vl"

    def checkpoint_recipe(self, path: str) -> dict[str, Any]:
        return {
            "model": {
                "vision": {"backbone": "qwen2_5_vl", "path": path, "patch_size": None},
                "pooling": {"kind": "tower", "size": None},
                "projector": {"kind": "identity"},
                "lm": {"path": path, "hf_config": None, "image_token": QWEN_IMAGE[0]},
            },
            "data": {"text": {"prompt": QWEN_IMAGE[0]}},
        }

    def native_mismatch(
        self, description: ModelDescription, lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
    ) -> str | None:
        """Why the described model cannot be a native Qwen2.5-VL checkpoint, in a few words; None when it can."""
        vocabulary = tokenizer.get_vocab()
        checks = (
            (description.pooling.kind == "tower", f"model.pooling.kind is {description.pooling.kind}, not tower"),
            (description.projector.kind == "identity", f"model.projector.kind is {description.projector.kind}, not identity"),
            (lm.config.model_type == TEXT_MODEL_TYPE, f"the language model is {lm.config.model_type}, not {TEXT_MODEL_TYPE}"),
            (set(description.levels) <= set(LEVELS), f"levels {description.levels} are not all vlmtrain's"),
            (description.lm.image_token == QWEN_IMAGE[0], f"the image token is not {QWEN_IMAGE[0]!r}"),
            (all(token in vocabulary for token in QWEN_IMAGE), f"the tokenizer lacks Qwen's {', '.join(QWEN_IMAGE)}"),
        )
        return next((reason for ok, reason in checks if not ok), None)


def qwen_config(description: ModelDescription, lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Qwen2_5_VLConfig:
    """The checkpoint's config: the tower's and the LM's own, the tokenizer's vision token ids."""
    image, start, end = (tokenizer.convert_tokens_to_ids(token) for token in QWEN_IMAGE)
    config = Qwen2_5_VLConfig(
        text_config=lm.config.to_dict(),
        vision_config=dict(description.vision.settings),
        image_token_id=image,
        vision_start_token_id=start,
        vision_end_token_id=end,
        tie_word_embeddings=getattr(lm.config, "tie_word_embeddings", False),
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    config.dtype = lm.config.dtype
    return config


def image_processor_config(cell: int, min_pixels: int, budget: int) -> dict[str, Any]:
    """``preprocessor_config.json``: Qwen's image processor, its default ``max_pixels`` the default budget's."""
    processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_pixels, "longest_edge": budget * cell**2}, patch_size=cell // 2, merge_size=2
    )
    values = json.loads(processor.to_json_string())
    values["image_processor_type"] = "Qwen2VLImageProcessor"  # transformers picks the backend it has
    values["processor_class"] = "Qwen2_5_VLProcessor"
    return values


QWEN2_5_VL = Qwen25VLFamily()
