"""The one builder: a :class:`~vlmtrain.model.description.ModelDescription` (and the tokenizer) in, the whole
model out. Training, export and loading all build through :func:`build_model`."""

from __future__ import annotations

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from vlmtrain.config import OptimConfig, PartConfig
from vlmtrain.model.description import ModelDescription
from vlmtrain.model.lm import build_lm, is_adapter_parameter
from vlmtrain.modeling.backbones import BACKBONES
from vlmtrain.modeling.hf_vision import load_gemma4_embedder
from vlmtrain.modeling.pooling import build_pooling
from vlmtrain.modeling.projector import build_projector
from vlmtrain.modeling.vlm import VisionLanguageModel
from vlmtrain.seeding import mix


def part_settings(optim: OptimConfig) -> dict[str, PartConfig]:
    return {"vision": optim.vision, "pooling": optim.pooling, "projector": optim.projector, "lm": optim.lm}


def set_trainable(model: VisionLanguageModel, optim: OptimConfig) -> None:
    """Freeze or unfreeze each part as the recipe says; an LM with LoRA adapters trains only the adapters."""
    for name, part in model.parts().items():
        part.requires_grad_(part_settings(optim)[name].trainable)
    if isinstance(model.lm, PeftModel):
        for parameter_name, parameter in model.lm.named_parameters():
            parameter.requires_grad_(optim.lm.trainable and is_adapter_parameter(parameter_name))


def build_model(description: ModelDescription, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> VisionLanguageModel:
    """The model ``description`` describes. Each part's random initialisation depends only on (seed, part):
    how another part is built (loaded, partitioned by ZeRO-3, given adapters) cannot change it."""
    geometry = description.geometry()
    vision = description.vision
    torch.manual_seed(mix(seed, 1))
    backbone = BACKBONES[vision.kind].build(vision.settings, vision.weights, vision.gradient_checkpointing)
    backbone.bins = tuple(level * geometry.pool**2 for level in geometry.levels)  # images of a level run together
    torch.manual_seed(mix(seed, 2))
    pooling = build_pooling(description.pooling.kind, geometry.pool, backbone.width, description.pooling.heads)
    torch.manual_seed(mix(seed, 3))
    lm = build_lm(description.lm, tokenizer)
    lm_width = lm.get_input_embeddings().embedding_dim
    torch.manual_seed(mix(seed, 4))
    projector = build_projector(description.projector.kind, backbone.width, description.projector.hidden_size, lm_width)
    if description.projector.kind == "gemma4" and vision.kind == "gemma4" and vision.weights is not None:
        load_gemma4_embedder(projector, vision.weights)  # a Gemma 4 checkpoint's tower comes with its embedder
    image_token_id = tokenizer.convert_tokens_to_ids(description.lm.image_token)
    return VisionLanguageModel(backbone, pooling, projector, lm, image_token_id, geometry)
