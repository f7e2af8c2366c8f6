"""Building the model from the recipe: backbone first, then the geometry it implies, then the rest."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from vlmtrain.config import ModelConfig, VisionConfig
from vlmtrain.geometry import Geometry
from vlmtrain.model.backbone import NativeViT, VisionBackbone
from vlmtrain.model.hf_vision import load_tower
from vlmtrain.model.lm import build_lm
from vlmtrain.model.pooling import build_pooling
from vlmtrain.model.projector import Projector
from vlmtrain.model.vlm import VisionLanguageModel


def build_backbone(config: VisionConfig) -> VisionBackbone:
    """The vision backbone the recipe names; HF towers read their patch size from their own config."""
    if config.backbone == "native":
        return NativeViT(
            patch_size=config.patch_size,
            width=config.width,
            depth=config.depth,
            heads=config.heads,
            mlp_ratio=config.mlp_ratio,
            rope_theta=config.rope_theta,
            stem=config.stem,
            gradient_checkpointing=config.gradient_checkpointing,
        )
    backbone = load_tower(config.backbone, config.path, config.hf_config)
    if config.patch_size is not None and config.patch_size != backbone.patch_size:
        raise ValueError(f"model.vision.patch_size={config.patch_size} but the {config.backbone} tower uses {backbone.patch_size}")
    if config.gradient_checkpointing:
        backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return backbone


def build_model(config: ModelConfig, levels: tuple[int, ...]) -> tuple[VisionLanguageModel, PreTrainedTokenizerBase]:
    """The whole model and its tokenizer; the geometry comes from the backbone's patch size and the pool."""
    backbone = build_backbone(config.vision)
    pool = config.pooling.size or backbone.native_pool
    geometry = Geometry(patch_size=backbone.patch_size, pool=pool, levels=tuple(levels))
    pooling = build_pooling(config.pooling.kind, pool, backbone.width, config.pooling.heads)
    lm, tokenizer = build_lm(config.lm)
    lm_width = lm.get_input_embeddings().embedding_dim
    projector = Projector(backbone.width, config.projector.hidden_size or lm_width, lm_width)
    image_token_id = tokenizer.convert_tokens_to_ids(config.lm.image_token)
    return VisionLanguageModel(backbone, pooling, projector, lm, image_token_id, geometry), tokenizer
