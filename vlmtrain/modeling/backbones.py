"""The backbone registry: every vision encoder kind, the native ViT included, behind one interface.

A kind checks a recipe's ``model.vision`` section, turns it into *settings* (a plain dict: what the model
description stores and an export writes), tells the patch size and its own pooling from them, and builds the
backbone from them with random weights (pretrained ones are loaded into it by :mod:`vlmtrain.model.pretrained`).
Reading the registry imports neither torch nor transformers (a recipe is checked in a fraction of a second):
a kind imports its classes when it builds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .errors import UserError, one_of, positive, require
from .geometry import Geometry

if TYPE_CHECKING:
    import transformers

    from .backbone import VisionBackbone


class VisionSection(Protocol):
    """What a kind reads from a recipe's ``model.vision`` section (:class:`vlmtrain.model.config.VisionConfig`;
    not imported: an export ships this file, which must not need the recipe's libraries)."""

    path: str | None
    hf_config: dict[str, Any]
    patch_size: int | None
    width: int
    depth: int
    heads: int
    mlp_ratio: float
    rope_theta: float
    stem: str


NATIVE_SETTINGS = ("patch_size", "width", "depth", "heads", "mlp_ratio", "rope_theta", "stem")
STEMS = ("conv", "linear")  # the native ViT's patch stems (:data:`.backbone.STEM_CLASSES`)


class BackboneKind:
    """One kind of vision encoder."""

    runs_per_grid = False  # runs once per patch grid (no masks), see the recipe rules on ZeRO-3
    pools_itself = False  # gives pooled tokens at the LM's width (pooling kind "tower", projector "identity")

    def check(self, vision: VisionSection) -> None:
        """The recipe rules of this kind's section; raises :class:`~.errors.InvalidSetting` (keys relative to it)."""

    def settings(self, vision: VisionSection) -> dict[str, Any]:
        """The complete settings of the recipe's backbone (HF towers read a local folder's config.json)."""
        raise NotImplementedError

    def build(self, settings: dict[str, Any], gradient_checkpointing: bool = False) -> VisionBackbone:
        """The backbone, with random weights."""
        raise NotImplementedError

    def patch_size(self, settings: dict[str, Any]) -> int:
        return int(settings["patch_size"])

    def geometry(self, settings: dict[str, Any], pool: int, levels: tuple[int, ...]) -> Geometry:
        """The budget geometry of a model with this encoder (its family's resize rule)."""
        return Geometry(self.patch_size(settings), pool, tuple(levels))

    def may_have_own_pool(self) -> bool:
        """Whether the encoder may come with a pool size of its own (then ``model.pooling.size`` may be unset)."""
        return False

    def own_pool(self, settings: dict[str, Any]) -> int | None:
        """The pool size the encoder was trained with, if it has one (Gemma 4: 3)."""
        return None


class NativeKind(BackboneKind):
    """The compact ViT of :mod:`.backbone`, its settings from the recipe's fields, its pretrained weights (if any)
    from a .safetensors file."""

    def check(self, vision: VisionSection) -> None:
        require(not vision.hf_config, "hf_config", "the native backbone is built from the recipe; hf_config is for HF backbones")
        require(
            vision.path is None or vision.path.endswith(".safetensors"),
            "path",
            f"{vision.path!r}: the native backbone loads a .safetensors file of its weights",
        )
        require(vision.patch_size is not None, "patch_size", "the native backbone needs a patch size")
        one_of("stem", vision.stem, STEMS)
        require(
            vision.stem != "conv" or not vision.patch_size & (vision.patch_size - 1),
            "patch_size",
            f"{vision.patch_size}: the conv stem needs a power of two (or stem: linear)",
        )
        for key in ("width", "depth", "heads", "mlp_ratio", "rope_theta"):
            positive(key, getattr(vision, key))
        require(
            vision.width % vision.heads == 0 and (vision.width // vision.heads) % 4 == 0,
            "width",
            f"{vision.width} must split into {vision.heads} heads of a size divisible by 4 (2-D RoPE)",
        )

    def settings(self, vision: VisionSection) -> dict[str, Any]:
        return {name: getattr(vision, name) for name in NATIVE_SETTINGS}

    def build(self, settings: dict[str, Any], gradient_checkpointing: bool = False) -> VisionBackbone:
        from .backbone import NativeViT

        return NativeViT(**settings, gradient_checkpointing=gradient_checkpointing)


@dataclass(frozen=True)
class TowerSpec:
    """One kind of Hugging Face vision tower: its transformers model and config classes and the backbone around
    it in :mod:`.hf_vision` (by name: looked up when a tower is built), its model_type, where its weights sit in
    a whole-model checkpoint that transformers cannot load the tower from (empty: it can), defaults its config
    takes here, the config key of its own pooling (None: it has none), whether it runs once per patch grid
    (no masks: see the recipe rules), whether it pools and projects to the LM's width itself, its family's
    resize rule (:mod:`.geometry`) with the smallest image area its processor leaves, and the config key of the
    frames one patch spans (None: one)."""

    model_class_name: str
    config_class_name: str
    backbone_class_name: str
    model_type: str
    prefixes: tuple[str, ...] = ()
    config_defaults: dict[str, Any] = field(default_factory=dict)
    own_pool_key: str | None = None
    runs_per_grid: bool = False
    pools_itself: bool = False
    resize_rule: str = "fill"
    min_pixels: int = 0
    frames_key: str | None = None

    @property
    def model_class(self) -> type[transformers.PreTrainedModel]:
        import transformers

        return getattr(transformers, self.model_class_name)

    @property
    def config_class(self) -> type[transformers.PreTrainedConfig]:
        import transformers

        return getattr(transformers, self.config_class_name)

    @property
    def backbone_class(self) -> type[VisionBackbone]:
        from .hf_vision import TOWER_BACKBONES

        return TOWER_BACKBONES[self.backbone_class_name]


TOWERS: dict[str, TowerSpec] = {
    "siglip2": TowerSpec(
        "Siglip2VisionModel", "Siglip2VisionConfig", "Siglip2Backbone", "siglip2_vision_model",
        config_defaults={"vision_use_head": False},
    ),
    "gemma4": TowerSpec(
        "Gemma4VisionModel", "Gemma4VisionConfig", "Gemma4Backbone", "gemma4_vision",
        prefixes=("model.vision_tower.", "vision_tower."), own_pool_key="pooling_kernel_size",
    ),
    "dinov2": TowerSpec("Dinov2Model", "Dinov2Config", "Dinov2Backbone", "dinov2", runs_per_grid=True),
    "qwen2_5_vl": TowerSpec(  # its patch merger included: it gives tokens at the LM's width
        "Qwen2_5_VisionTransformerPretrainedModel", "Qwen2_5_VLVisionConfig", "Qwen25VLBackbone", "qwen2_5_vl_vision",
        prefixes=("model.visual.", "visual."), own_pool_key="spatial_merge_size", pools_itself=True,
        resize_rule="smart_resize", min_pixels=56 * 56, frames_key="temporal_patch_size",
    ),
    "qwen3_vl": TowerSpec(  # as Qwen2.5-VL's; its DeepStack features go to the LM's first layers
        "Qwen3VLVisionModel", "Qwen3VLVisionConfig", "Qwen3VLBackbone", "qwen3_vl_vision",
        prefixes=("model.visual.", "visual."), own_pool_key="spatial_merge_size", pools_itself=True,
        resize_rule="smart_resize", min_pixels=256 * 256, frames_key="temporal_patch_size",
    ),
}


def read_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a local model folder."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a local Hugging Face model folder)")
    return json.loads(config_file.read_text())


class TowerKind(BackboneKind):
    """A Hugging Face vision tower (SigLIP2, Gemma 4, DINOv2, Qwen2.5-VL, Qwen3-VL); its settings are the model-specific keys
    of its transformers config."""

    def __init__(self, name: str, spec: TowerSpec) -> None:
        self.name = name
        self.spec = spec
        self.runs_per_grid = spec.runs_per_grid
        self.pools_itself = spec.pools_itself

    def geometry(self, settings: dict[str, Any], pool: int, levels: tuple[int, ...]) -> Geometry:
        frames = settings[self.spec.frames_key] if self.spec.frames_key else 1
        return Geometry(self.patch_size(settings), pool, tuple(levels), self.spec.resize_rule, self.spec.min_pixels, frames)

    def check(self, vision: VisionSection) -> None:
        needs = f"backbone {self.name!r} needs a local path or an hf_config"
        require(vision.path is not None or bool(vision.hf_config), "path", needs)

    def settings(self, vision: VisionSection) -> dict[str, Any]:
        from transformers import PreTrainedConfig

        values: dict[str, Any] = {}
        if vision.path is not None:
            stored = read_config(vision.path)
            values = stored if stored.get("model_type") == self.spec.model_type else stored.get("vision_config") or {}
            if not values:
                kind = self.spec.model_type
                raise UserError(f"model.vision.path: {vision.path}: config.json is no {kind} config and holds no vision_config")
        merged = {**values, **self.spec.config_defaults, **vision.hf_config}
        generic = PreTrainedConfig().to_dict().keys()
        config = self.spec.config_class(**{key: value for key, value in merged.items() if key not in generic})
        return {key: value for key, value in config.to_dict().items() if key not in generic}

    def config(self, settings: dict[str, Any], attn_implementation: str = "sdpa") -> transformers.PreTrainedConfig:
        """The tower's transformers config from its settings."""
        config = self.spec.config_class(**settings)
        config._attn_implementation = attn_implementation
        return config

    def build(self, settings: dict[str, Any], gradient_checkpointing: bool = False) -> VisionBackbone:
        return self.wrap(self.spec.model_class(self.config(settings)), gradient_checkpointing)

    def wrap(self, model: transformers.PreTrainedModel, gradient_checkpointing: bool = False) -> VisionBackbone:
        """The backbone around a transformers tower of this kind."""
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return self.spec.backbone_class(model)

    def may_have_own_pool(self) -> bool:
        return self.spec.own_pool_key is not None

    def own_pool(self, settings: dict[str, Any]) -> int | None:
        return settings.get(self.spec.own_pool_key) if self.spec.own_pool_key else None


BACKBONES: dict[str, BackboneKind] = {"native": NativeKind(), **{name: TowerKind(name, spec) for name, spec in TOWERS.items()}}
