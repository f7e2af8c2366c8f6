"""Pretrained weights from local files into a model's parts, also when DeepSpeed ZeRO-3 created the parts
partitioned: a native ViT's .safetensors file, a Hugging Face tower's folder, or the tensors under a prefix of
a whole vision-language checkpoint. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmtrain.errors import UserError
from vlmtrain.modeling.backbone import VisionBackbone
from vlmtrain.modeling.backbones import BACKBONES, TowerKind, read_config
from vlmtrain.weights import open_weights, read_weights


class WeightsMismatch(UserError, ValueError):
    """Weights that do not fit the backbone the recipe builds."""


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


def prefixed_tensors(path: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Tensors under the first of ``prefixes`` found in the folder's safetensors files, prefix removed."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors weights")
    tensors: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in prefixes}
    for file in files:
        with open_weights(file) as handle:
            for name in handle.keys():
                for prefix in prefixes:
                    if name.startswith(prefix):
                        tensors[prefix][name[len(prefix) :]] = handle.get_tensor(name)
    found = [prefix for prefix in prefixes if tensors[prefix]]
    if not found:
        raise ValueError(f"{path}: no weights under {' or '.join(prefixes)}")
    return tensors[found[0]]


def pretrained_backbone(
    kind_name: str, settings: dict[str, Any], path: str, gradient_checkpointing: bool = False
) -> VisionBackbone:
    """The backbone of kind ``kind_name`` with ``settings``, its weights read from the local ``path``."""
    kind = BACKBONES[kind_name]
    if isinstance(kind, TowerKind):
        return pretrained_tower(kind, settings, path, gradient_checkpointing)
    backbone = kind.build(settings, gradient_checkpointing)
    load_native_weights(backbone, path)
    return backbone


def pretrained_tower(
    kind: TowerKind, settings: dict[str, Any], path: str, gradient_checkpointing: bool = False
) -> VisionBackbone:
    """A Hugging Face tower loaded from the local folder ``path``: the tower's own folder, or a whole-model
    checkpoint holding it.

    transformers loads the folder when it can (it renames legacy weight names, and under DeepSpeed ZeRO-3
    loads them partitioned); a whole-model checkpoint it cannot take the tower from is read by prefix."""
    spec, config = kind.spec, kind.config(settings)
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
    return kind.wrap(model, gradient_checkpointing)


def load_native_weights(backbone: nn.Module, path: str) -> None:
    """Load a native backbone's weights from the .safetensors file at ``path`` (also into ZeRO-3 partitioned
    parameters); weights that do not fit the recipe's backbone (another width, depth, patch size or stem)
    are refused, naming the first misfit."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"model.vision.path: {path!r} not found (only local files are read)")
    weights = read_weights(path)
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
