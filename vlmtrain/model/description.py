"""The model description: one serialisable account of what a model computes, which training builds from,
export writes and :func:`vlmtrain.load` reads, all through :func:`vlmtrain.families.build_model`.

It holds the backbone's kind and complete settings (a native ViT's sizes, an HF tower's config keys), the
pooling, the projector, the language model's image token and attention, and the budgets the model serves;
the geometry is derived from it, never stored beside it. What a model *starts from* (pretrained weights, an
LM folder or config, LoRA adapters) and how training runs it (gradient checkpointing) is the :class:`Start`,
not the description: an export starts from its own files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from vlmtrain.budget import BudgetConfig, default_budget
from vlmtrain.errors import UserError
from vlmtrain.model.config import LMConfig, LoraConfig, ModelConfig
from vlmtrain.modeling.backbones import BACKBONES
from vlmtrain.modeling.geometry import Geometry


@dataclass
class VisionDescription:
    """The backbone: its registry kind and complete settings."""

    kind: str = ""
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class PoolingDescription:
    """The pooling: its kind, pool size (pool×pool patches per visual token) and attention heads."""

    kind: str = ""
    size: int = 0
    heads: int = 0


@dataclass
class ProjectorDescription:
    """The projector: its kind and hidden size (None: the LM's width, or no hidden layer)."""

    kind: str = ""
    hidden_size: int | None = None


@dataclass
class LMDescription:
    """What the model asks of its language model (whose own config lives with its weights): the token that
    holds an image's place, and the attention implementation it runs with."""

    image_token: str = ""
    attn_implementation: str = ""


@dataclass
class ModelDescription:
    """Everything that decides what a model computes (see the module docstring)."""

    vision: VisionDescription = field(default_factory=VisionDescription)
    pooling: PoolingDescription = field(default_factory=PoolingDescription)
    projector: ProjectorDescription = field(default_factory=ProjectorDescription)
    lm: LMDescription = field(default_factory=LMDescription)
    levels: list[int] = field(default_factory=list)
    default_budget: int = 0

    def geometry(self) -> Geometry:
        """The budget geometry the model has: its backbone's patch size, its pool size, its levels."""
        return BACKBONES[self.vision.kind].geometry(self.vision.settings, self.pooling.size, tuple(self.levels))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Start:
    """Where a model's weights start from and how training runs its parts, beyond what it computes: the vision
    weights (a local path; None: random, or an export's own files), gradient checkpointing, LoRA adapters on the
    vision encoder and on the projector, and the LM's source (a folder or a config, its tokenizer, LoRA adapters
    new or from a folder)."""

    lm: LMConfig
    vision_weights: str | None = None
    vision_checkpointing: bool = False
    vision_lora: LoraConfig | None = None
    projector_lora: LoraConfig | None = None

    @classmethod
    def of(cls, model: ModelConfig) -> Start:
        """What a recipe's ``model`` section starts from."""
        vision, projector = (lora if lora.rank else None for lora in (model.vision.lora, model.projector.lora))
        return cls(model.lm, model.vision.path, model.vision.gradient_checkpointing, vision, projector)


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
        kind.geometry(settings, pool, tuple(budget.levels))
    except UserError as error:
        raise UserError(f"model.pooling.size: {error}") from None
    return ModelDescription(
        vision=VisionDescription(vision.backbone, settings),
        pooling=PoolingDescription(model.pooling.kind, pool, model.pooling.heads),
        projector=ProjectorDescription(model.projector.kind, model.projector.hidden_size),
        lm=LMDescription(model.lm.image_token, model.lm.attn_implementation),
        levels=list(budget.levels),
        default_budget=default_budget(budget.levels, budget.default),
    )
