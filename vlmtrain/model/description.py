"""The model description: one serialisable account of a model that training builds from, export writes and
:func:`vlmtrain.load` reads, all through :func:`vlmtrain.model.build.build_model`.

It holds the backbone's kind and complete settings (a native ViT's sizes, an HF tower's config keys), the
pooling, the projector, the language model's source and the budgets the model serves; the geometry is
derived from it, never stored beside it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from vlmtrain.budget import BudgetConfig, default_budget
from vlmtrain.config import RecipeError, structured
from vlmtrain.errors import UserError
from vlmtrain.model.config import LMConfig, ModelConfig, PoolingConfig, ProjectorConfig
from vlmtrain.modeling.backbones import BACKBONES
from vlmtrain.modeling.geometry import Geometry


@dataclass
class VisionDescription:
    """The backbone: its registry kind and complete settings, the pretrained weights it starts from (a local
    path; None: random weights, which an export's own weights file then replaces)."""

    kind: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    gradient_checkpointing: bool = False


@dataclass
class ModelDescription:
    """Everything that decides what a model computes (see the module docstring)."""

    vision: VisionDescription = field(default_factory=VisionDescription)
    pooling: PoolingConfig = field(default_factory=PoolingConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    levels: list[int] = field(default_factory=list)
    default_budget: int = 0

    def geometry(self) -> Geometry:
        """The budget geometry the model has: its backbone's patch size, its pool size, its levels."""
        patch_size = BACKBONES[self.vision.kind].patch_size(self.vision.settings)
        return Geometry(patch_size=patch_size, pool=self.pooling.size, levels=tuple(self.levels))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_model(model: ModelConfig, budget: BudgetConfig) -> ModelDescription:
    """The description of a recipe's model, from the recipe and the backbone's config alone (no weights are
    read): HF towers' settings come from their local config.json, the pool size from the tower when the
    recipe leaves it unset."""
    vision = model.vision
    kind = BACKBONES[vision.backbone]
    settings = kind.settings(vision)
    patch_size = kind.patch_size(settings)
    if vision.patch_size is not None and vision.patch_size != patch_size:
        raise UserError(f"model.vision.patch_size: {vision.patch_size}, but the {vision.backbone} tower uses {patch_size}")
    pool = model.pooling.size or kind.own_pool(settings)
    if pool is None:
        raise UserError(f"model.pooling.size: backbone {vision.backbone!r} has no pool size of its own; set one (e.g. 2)")
    try:
        Geometry(patch_size, pool, tuple(budget.levels))
    except UserError as error:
        raise UserError(f"model.pooling.size: {error}") from None
    return ModelDescription(
        vision=VisionDescription(vision.backbone, settings, vision.path, vision.gradient_checkpointing),
        pooling=replace(model.pooling, size=pool),
        projector=model.projector,
        lm=model.lm,
        levels=list(budget.levels),
        default_budget=default_budget(budget.levels, budget.default),
    )


def read_description(values: Any, source: str, prefix: str = "") -> ModelDescription:
    """A description from JSON values (found at ``prefix`` in file ``source``); an unknown, missing or
    mistyped key raises :class:`UserError` naming it."""
    if not isinstance(values, dict):
        raise UserError(f"{source}: {prefix or 'the model description'}: must be a JSON object")
    try:
        description = structured(ModelDescription, [values], source, prefix)
    except RecipeError as error:
        raise UserError(str(error)) from None
    difference = first_difference(values, description.to_dict())
    if difference is not None and difference[1] is None:  # the schema filled in a key the JSON lacks
        raise UserError(f"{source}: {prefix}{difference[0]}: missing")
    if description.vision.kind not in BACKBONES:
        raise UserError(f"{source}: {prefix}vision.kind: {description.vision.kind!r} is not one of {', '.join(BACKBONES)}")
    return description


def first_difference(found: Any, expected: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """The first dotted key at which two JSON-like values differ, with both values; None when equal."""
    if isinstance(found, dict) and isinstance(expected, dict):
        for name in sorted(found.keys() | expected.keys()):
            inner = first_difference(found.get(name), expected.get(name), f"{key}.{name}" if key else name)
            if inner is not None:
                return inner
        return None
    if isinstance(found, list) and isinstance(expected, list) and len(found) == len(expected):
        for index, (a, b) in enumerate(zip(found, expected, strict=True)):
            inner = first_difference(a, b, f"{key}[{index}]")
            if inner is not None:
                return inner
        return None
    return None if found == expected else (key, found, expected)


def canonical_json(description: ModelDescription) -> str:
    """The description as compact, key-sorted JSON: what an export stores beside its weights."""
    return json.dumps(description.to_dict(), sort_keys=True, separators=(",", ":"))
