"""Building the model from the recipe: backbone first, then the geometry it implies, then the rest."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from vlmtrain.config import ModelConfig, OptimConfig, PartConfig, VisionConfig
from vlmtrain.errors import UserError
from vlmtrain.geometry import Geometry
from vlmtrain.model.backbone import NativeViT, VisionBackbone
from vlmtrain.model.hf_vision import load_tower, load_weights, tower_config
from vlmtrain.model.lm import build_lm
from vlmtrain.model.pooling import build_pooling
from vlmtrain.model.projector import Projector
from vlmtrain.model.vlm import VisionLanguageModel
from vlmtrain.seeding import mix


def part_settings(optim: OptimConfig) -> dict[str, PartConfig]:
    return {"vision": optim.vision, "pooling": optim.pooling, "projector": optim.projector, "lm": optim.lm}


def set_trainable(model: VisionLanguageModel, optim: OptimConfig) -> None:
    """Freeze or unfreeze each part as the recipe says; an LM with LoRA adapters trains only the adapters."""
    for name, part in model.parts().items():
        part.requires_grad_(part_settings(optim)[name].trainable)
    if isinstance(model.lm, PeftModel):
        for parameter_name, parameter in model.lm.named_parameters():
            parameter.requires_grad_(optim.lm.trainable and "lora_" in parameter_name)


class WeightsMismatch(UserError, ValueError):
    """Weights that do not fit the backbone the recipe builds."""


def load_native_weights(backbone: NativeViT, path: str) -> None:
    """Load a native backbone's weights from the .safetensors file at ``path`` (also into ZeRO-3 partitioned
    parameters); weights that do not fit the recipe's backbone (another width, depth, patch size or stem)
    are refused, naming the first misfit."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"model.vision.path: {path!r} not found (only local files are read)")
    weights = load_file(path)
    expected = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in backbone.named_parameters()}
    for name in sorted(expected.keys() | weights.keys()):
        found = tuple(weights[name].shape) if name in weights else None
        if found != expected.get(name):
            found_text = "missing" if found is None else f"shape {found}"
            built_text = str(expected[name]) if name in expected else "no such weight"
            raise WeightsMismatch(f"model.vision.path: {path} does not fit the recipe's native backbone: {name} is {found_text}, "
                                  f"the recipe builds {built_text} (check width, depth, heads, patch_size, stem)")
    load_weights(backbone, weights)


def build_backbone(config: VisionConfig) -> VisionBackbone:
    """The vision backbone the recipe names; HF towers read their patch size from their own config."""
    if config.backbone == "native":
        backbone = NativeViT(
            patch_size=config.patch_size,
            width=config.width,
            depth=config.depth,
            heads=config.heads,
            mlp_ratio=config.mlp_ratio,
            rope_theta=config.rope_theta,
            stem=config.stem,
            gradient_checkpointing=config.gradient_checkpointing,
        )
        if config.path is not None:
            load_native_weights(backbone, config.path)
        return backbone
    backbone = load_tower(config.backbone, config.path, config.hf_config)
    if config.gradient_checkpointing:
        backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return backbone


def plan_geometry(config: ModelConfig, levels: tuple[int, ...]) -> Geometry:
    """The geometry the model will have, from the recipe and the backbone's config alone (no weights):
    the data pipeline is built from it before the model exists."""
    vision = config.vision
    if vision.backbone == "native":
        patch_size, native_pool = vision.patch_size, None
    else:
        tower = tower_config(vision.backbone, vision.path, vision.hf_config)
        patch_size, native_pool = tower.patch_size, getattr(tower, "pooling_kernel_size", None)
    if vision.patch_size is not None and vision.patch_size != patch_size:
        raise ValueError(f"model.vision.patch_size={vision.patch_size} but the {vision.backbone} tower uses {patch_size}")
    return Geometry(patch_size=patch_size, pool=config.pooling.size or native_pool, levels=tuple(levels))


def build_model(config: ModelConfig, levels: tuple[int, ...], tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> VisionLanguageModel:
    """The whole model. Each part's random initialisation depends only on (seed, part): how another part is
    built (loaded, partitioned by ZeRO-3, given adapters) cannot change it."""
    geometry = plan_geometry(config, levels)
    torch.manual_seed(mix(seed, 1))
    backbone = build_backbone(config.vision)
    torch.manual_seed(mix(seed, 2))
    pooling = build_pooling(config.pooling.kind, geometry.pool, backbone.width, config.pooling.heads)
    torch.manual_seed(mix(seed, 3))
    lm = build_lm(config.lm, tokenizer)
    lm_width = lm.get_input_embeddings().embedding_dim
    torch.manual_seed(mix(seed, 4))
    projector = Projector(backbone.width, config.projector.hidden_size or lm_width, lm_width)
    image_token_id = tokenizer.convert_tokens_to_ids(config.lm.image_token)
    return VisionLanguageModel(backbone, pooling, projector, lm, image_token_id, geometry)
