"""The backbone registry: every vision encoder kind, the native ViT included, behind one interface.

A kind turns a recipe's ``model.vision`` section into *settings* (a plain dict: what the model description
stores and an export writes), tells the patch size and its own pooling from them, and builds the backbone
from them, with random weights or starting from pretrained ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from safetensors.torch import load_file
from transformers import PreTrainedConfig

from .backbone import NativeViT, VisionBackbone
from .errors import UserError
from .hf_vision import TOWERS, TowerSpec, load_tower, load_weights, read_config


class VisionSection(Protocol):
    """What a kind reads from a recipe's ``model.vision`` section (:class:`vlmtrain.config.VisionConfig`; not
    imported: an export ships this file, which must not need the recipe's libraries)."""

    path: str | None
    hf_config: dict[str, Any]


NATIVE_SETTINGS = ("patch_size", "width", "depth", "heads", "mlp_ratio", "rope_theta", "stem")


class WeightsMismatch(UserError, ValueError):
    """Weights that do not fit the backbone the recipe builds."""


class BackboneKind:
    """One kind of vision encoder."""

    def settings(self, vision: VisionSection) -> dict[str, Any]:
        """The complete settings of the recipe's backbone (HF towers read a local folder's config.json)."""
        raise NotImplementedError

    def build(self, settings: dict[str, Any], weights: str | None, gradient_checkpointing: bool = False) -> VisionBackbone:
        """The backbone with random weights, or starting from the pretrained ``weights`` (a local path)."""
        raise NotImplementedError

    def patch_size(self, settings: dict[str, Any]) -> int:
        return int(settings["patch_size"])

    def own_pool(self, settings: dict[str, Any]) -> int | None:
        """The pool size the encoder was trained with, if it has one (Gemma 4: 3)."""
        return None


class NativeKind(BackboneKind):
    """The compact ViT of :mod:`vlmtrain.modeling.backbone`, its settings from the recipe's fields, its
    pretrained weights (if any) from a .safetensors file."""

    def settings(self, vision: VisionSection) -> dict[str, Any]:
        return {name: getattr(vision, name) for name in NATIVE_SETTINGS}

    def build(self, settings: dict[str, Any], weights: str | None, gradient_checkpointing: bool = False) -> VisionBackbone:
        backbone = NativeViT(**settings, gradient_checkpointing=gradient_checkpointing)
        if weights is not None:
            load_native_weights(backbone, weights)
        return backbone


class TowerKind(BackboneKind):
    """A Hugging Face vision tower (SigLIP2, Gemma 4, DINOv2); its settings are the model-specific keys of its
    transformers config."""

    def __init__(self, name: str, spec: TowerSpec) -> None:
        self.name = name
        self.spec = spec

    def settings(self, vision: VisionSection) -> dict[str, Any]:
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

    def build(self, settings: dict[str, Any], weights: str | None, gradient_checkpointing: bool = False) -> VisionBackbone:
        backbone = load_tower(self.spec, self.spec.config_class(**settings), weights)
        if gradient_checkpointing:
            backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return backbone

    def own_pool(self, settings: dict[str, Any]) -> int | None:
        return settings.get("pooling_kernel_size")


BACKBONES: dict[str, BackboneKind] = {"native": NativeKind(), **{name: TowerKind(name, spec) for name, spec in TOWERS.items()}}


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
            raise WeightsMismatch(
                f"model.vision.path: {path} does not fit the recipe's native backbone: {name} is {found_text}, "
                f"the recipe builds {built_text} (check width, depth, heads, patch_size, stem)"
            )
    load_weights(backbone, weights)
