"""Model families, the one registry the rest of the code asks: which family a model is of, how it is built
(:func:`build_model`, the one builder that training, export and loading all use), how a family's whole
checkpoints are read, and its native export.

A family lives in its own module: :mod:`.assembled` (the default: models vlmtrain assembles from parts, and
the base of every family), :mod:`.gemma4` and :mod:`.qwen_vl` (Qwen2.5-VL and Qwen3-VL). A new family is one
module and one entry in :data:`FAMILIES`.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from vlmtrain.errors import UserError
from vlmtrain.families.assembled import ASSEMBLED, Family
from vlmtrain.families.gemma4 import GEMMA4
from vlmtrain.families.qwen_vl import QWEN2_5_VL, QWEN3_VL
from vlmtrain.model.description import ModelDescription, Start
from vlmtrain.modeling.backbones import read_config
from vlmtrain.modeling.prompt import FrameLayout
from vlmtrain.modeling.vlm import VisionLanguageModel

FAMILIES: tuple[Family, ...] = (GEMMA4, QWEN2_5_VL, QWEN3_VL)  # asked in order; a model none of them concerns is assembled
CHECKPOINT_LMS = {model_type: keys for family in FAMILIES for model_type, keys in family.checkpoint_lms.items()}


def checkpoint_recipe(path: str) -> dict[str, Any]:
    """The recipe values that read the whole VLM checkpoint at ``path``: its family's (by its config's model_type)."""
    model_type = read_config(path).get("model_type")
    family = next((family for family in FAMILIES if model_type in family.checkpoint_lms), None)
    if family is None:
        known = ", ".join(sorted(CHECKPOINT_LMS))
        raise UserError(f"model.checkpoint: {path} holds a {model_type} model; whole checkpoints read: {known} "
                        "(for others, set model.vision and model.lm)")
    return family.checkpoint_recipe(path)


def family_of(description: ModelDescription) -> Family:
    """The family of the described model."""
    return next((family for family in FAMILIES if family.concerns(description)), ASSEMBLED)


def frame_layout(description: ModelDescription, tokenizer: PreTrainedTokenizerBase) -> FrameLayout:
    """How the described model's text holds a video: its family's layout (:meth:`Family.frame_layout`)."""
    return family_of(description).frame_layout(description, tokenizer)


def build_model(
    description: ModelDescription, start: Start, tokenizer: PreTrainedTokenizerBase, seed: int = 0
) -> VisionLanguageModel:
    """The model ``description`` describes, its weights from ``start``, built by its family (:meth:`Family.build`)."""
    return family_of(description).build(description, start, tokenizer, seed, CHECKPOINT_LMS)
