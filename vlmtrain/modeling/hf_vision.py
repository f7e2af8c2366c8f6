"""Hugging Face vision towers as backbones: SigLIP2 NaFlex and Gemma 4's vision encoder.

Built from a config (random weights) or loaded from a local folder holding either the vision model
alone or a whole vision-language checkpoint (only the tower's tensors are read). Nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Gemma4VisionConfig,
    Gemma4VisionModel,
    PreTrainedConfig,
    Siglip2VisionConfig,
    Siglip2VisionModel,
)

from .backbone import VisionBackbone, canvases, run_by_grid, run_in_bins, unit_pixels


class Siglip2Backbone(VisionBackbone):
    """SigLIP2 NaFlex: pixels normalised to [-1, 1], per-image ``spatial_shapes`` for its resized position table;
    its own attention mask over the padding of each bin of images (:func:`run_in_bins`)."""

    def __init__(self, model: Siglip2VisionModel) -> None:
        super().__init__()
        self.model = model
        self.patch_size = model.config.patch_size
        self.width = model.config.hidden_size

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor, patch_grids: torch.Tensor) -> torch.Tensor:
        dtype = self.model.embeddings.patch_embedding.weight.dtype

        def dense(images: torch.Tensor, places: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
            output = self.model(
                pixel_values=unit_pixels(images, dtype) * 2.0 - 1.0,
                pixel_attention_mask=places[..., 0] >= 0,
                spatial_shapes=grids,
            )
            return output.last_hidden_state

        return run_in_bins(pixels, positions, patch_grids, self.bins, self.width, dtype, dense)


class Gemma4Backbone(VisionBackbone):
    """Gemma 4's vision encoder up to (not including) its pooler.

    Features are scaled by sqrt(width) and standardized as Gemma 4 does after pooling; both are affine,
    so average pooling of these features equals Gemma4VisionModel's output exactly.
    """

    def __init__(self, model: Gemma4VisionModel) -> None:
        super().__init__()
        self.model = model
        self.patch_size = model.config.patch_size
        self.width = model.config.hidden_size

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor, patch_grids: torch.Tensor) -> torch.Tensor:
        dtype = self.model.patch_embedder.input_proj.weight.dtype

        def dense(images: torch.Tensor, places: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
            padding = places[..., 0] < 0
            embeds = self.model.patch_embedder(unit_pixels(images, dtype), places, padding)
            return self.model.encoder(inputs_embeds=embeds, attention_mask=~padding, pixel_position_ids=places).last_hidden_state

        hidden = run_in_bins(pixels, positions, patch_grids, self.bins, self.width, torch.float32, dense) * self.width**0.5
        if self.model.config.standardize:
            hidden = (hidden - self.model.std_bias.float()) * self.model.std_scale.float()
        return hidden


class Dinov2Backbone(VisionBackbone):
    """DINOv2 (ImageNet-normalised pixels; its position table is interpolated to each grid). It takes whole
    images without a mask, so images run in groups of equal patch grid (as many calls as grids: under ZeRO-3,
    steps must then hold one grid, see the recipe rules); the class and register tokens are dropped, the
    patch tokens kept."""

    def __init__(self, model: Dinov2Model) -> None:
        super().__init__()
        self.model = model
        self.patch_size = model.config.patch_size
        self.width = model.config.hidden_size
        self.register_buffer("mean", torch.empty(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.empty(1, 3, 1, 1), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Set ImageNet's mean and std (non-persistent buffers, see :meth:`Rope2D.reset_buffers`)."""
        self.mean.copy_(torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.std.copy_(torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor, patch_grids: torch.Tensor) -> torch.Tensor:
        dtype = self.model.embeddings.patch_embeddings.projection.weight.dtype
        skip = 1 + getattr(self.model.config, "num_register_tokens", 0)

        def dense(images: torch.Tensor, _: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
            canvas = canvases(images, grid, self.patch_size, dtype)
            return self.model(pixel_values=(canvas - self.mean.to(dtype)) / self.std.to(dtype)).last_hidden_state[:, skip:]

        return run_by_grid(pixels, positions, patch_grids, self.width, dtype, dense)


@dataclass(frozen=True)
class TowerSpec:
    """How to find one kind of vision tower: its classes, model_type, and the weight prefixes to read in a
    whole-model checkpoint that transformers cannot load the tower from (empty: it can)."""

    model_class: type[nn.Module]
    config_class: type[PreTrainedConfig]
    backbone_class: type[VisionBackbone]
    model_type: str
    prefixes: tuple[str, ...]
    config_defaults: dict[str, Any]


TOWERS: dict[str, TowerSpec] = {
    "siglip2": TowerSpec(
        Siglip2VisionModel, Siglip2VisionConfig, Siglip2Backbone, "siglip2_vision_model", (), {"vision_use_head": False}
    ),
    "gemma4": TowerSpec(
        Gemma4VisionModel, Gemma4VisionConfig, Gemma4Backbone, "gemma4_vision", ("model.vision_tower.", "vision_tower."), {}
    ),
    "dinov2": TowerSpec(Dinov2Model, Dinov2Config, Dinov2Backbone, "dinov2", (), {}),
}


def read_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a local model folder."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a local Hugging Face model folder)")
    return json.loads(config_file.read_text())


def prefixed_tensors(path: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Tensors under the first of ``prefixes`` found in the folder's safetensors files, prefix removed."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors weights")
    tensors: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in prefixes}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                for prefix in prefixes:
                    if name.startswith(prefix):
                        tensors[prefix][name[len(prefix) :]] = handle.get_tensor(name)
    found = [prefix for prefix in prefixes if tensors[prefix]]
    if not found:
        raise ValueError(f"{path}: no weights under {' or '.join(prefixes)}")
    return tensors[found[0]]


def load_tower(spec: TowerSpec, config: PreTrainedConfig, path: str | None, attn_implementation: str = "sdpa") -> VisionBackbone:
    """The tower ``spec`` with ``config``: random weights (``path`` None) or loaded from a local folder.

    transformers loads the folder when it can (it renames legacy weight names, and under DeepSpeed ZeRO-3
    loads them partitioned); a whole-model checkpoint it cannot take the tower from is read by prefix."""
    config._attn_implementation = attn_implementation
    if path is None:
        return spec.backbone_class(spec.model_class(config))
    if read_config(path).get("model_type") == spec.model_type or not spec.prefixes:
        model, info = spec.model_class.from_pretrained(
            path, config=config, local_files_only=True, dtype=torch.get_default_dtype(), output_loading_info=True
        )
        missing = info["missing_keys"]
    else:
        model = spec.model_class(config)
        state = prefixed_tensors(Path(path), spec.prefixes)
        missing = [name for name in model.state_dict() if name not in state]
        if not missing:
            load_weights(model, state)
    if missing:
        raise ValueError(f"{path}: {len(missing)} {spec.model_type} weights missing, e.g. {sorted(missing)[:3]}")
    return spec.backbone_class(model)


GEMMA4_EMBEDDER_PREFIXES = ("model.embed_vision.", "embed_vision.")


def load_gemma4_embedder(projector: nn.Module, path: str) -> None:
    """Load Gemma 4's multimodal embedder into a ``gemma4`` projector from the whole Gemma 4 checkpoint at
    ``path`` (the one its tower comes from); nothing when the folder holds none (a vision-only folder)."""
    try:
        state = prefixed_tensors(Path(path), GEMMA4_EMBEDDER_PREFIXES)
    except ValueError:  # no weights under those prefixes
        return
    load_weights(projector, state)


def load_weights(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``module.load_state_dict(state)``, also when DeepSpeed ZeRO-3 created its parameters partitioned:
    they are gathered, filled (rank 0's values are kept) and partitioned again."""
    parameters = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not parameters:
        module.load_state_dict(state, strict=False)
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parameters, modifier_rank=0):
        module.load_state_dict(state, strict=False)
