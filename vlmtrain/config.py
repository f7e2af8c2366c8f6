"""Recipes: YAML files read by OmegaConf over a typed dataclass tree, validated before any heavy work.

``load_recipe(path, overrides)`` merges schema defaults, the YAML file and ``key=value`` overrides,
converts the result back into :class:`Recipe` objects and checks cross-field rules in :func:`validate`.
Every problem raises :class:`RecipeError` whose message is one line naming the key.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf import errors as oc_errors

from vlmtrain.errors import UserError
from vlmtrain.geometry import DEFAULT_BUDGET, LEVELS

BACKBONES = ("native", "siglip2", "gemma4", "dinov2")
STEMS = ("conv", "linear")
POOLINGS = ("average", "attention")
LOGGERS = ("wandb", "csv", "none")
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed")
LR_SCHEDULES = ("cosine", "constant")
STRATEGIES = ("auto", "ddp", "deepspeed")


class RecipeError(UserError, ValueError):
    """A recipe that cannot run: unknown key, wrong type or invalid value. The message is one line."""


@dataclass
class BudgetConfig:
    """Token budgets trained, their sampling weights, and the budget used when none is given."""

    levels: list[int] = field(default_factory=lambda: list(LEVELS))
    weights: list[float] | None = None
    mode: str = "sample"
    default: int = DEFAULT_BUDGET


@dataclass
class VisionConfig:
    """The vision encoder. ``native`` is built from the fields below (starting from the weights in ``path``, a
    .safetensors file, when given); HF backbones from a local ``path`` or from ``hf_config``."""

    backbone: str = "native"
    path: str | None = None
    hf_config: dict[str, Any] = field(default_factory=dict)
    patch_size: int | None = None
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    rope_theta: float = 100.0
    stem: str = "conv"
    gradient_checkpointing: bool = False


@dataclass
class PoolingConfig:
    """pool×pool windows of patches become one visual token; ``size`` None takes the backbone's own."""

    kind: str = "average"
    size: int | None = None
    heads: int = 4


@dataclass
class ProjectorConfig:
    """Norm + MLP from the vision width to the language model's width."""

    hidden_size: int | None = None


@dataclass
class LoraConfig:
    """LoRA adapters on the LM (PEFT); ``rank`` 0 means none. With adapters, a trainable LM trains only them."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class LMConfig:
    """A Hugging Face causal LM: from a local ``path``, or random weights from ``hf_config`` (needs model_type)."""

    path: str | None = None
    hf_config: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    image_token: str = "<image>"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    pooling: PoolingConfig = field(default_factory=PoolingConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    lm: LMConfig = field(default_factory=LMConfig)


@dataclass
class PartConfig:
    """Whether one part of the model trains, and its learning rate."""

    trainable: bool = True
    lr: float = 1e-4


@dataclass
class OptimConfig:
    """AdamW with one parameter group per model part, linear warm-up then cosine or constant."""

    vision: PartConfig = field(default_factory=lambda: PartConfig(True, 1e-4))
    pooling: PartConfig = field(default_factory=lambda: PartConfig(True, 1e-3))
    projector: PartConfig = field(default_factory=lambda: PartConfig(True, 1e-3))
    lm: PartConfig = field(default_factory=lambda: PartConfig(False, 2e-5))
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class SourceConfig:
    """A set of shards (spec: paths, brace patterns, ``::`` lists, ``pipe:`` URLs) and its weight."""

    spec: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    """Shards, batching, and how samples become text (the prompt's ``<image>`` marks where images go).

    ``train`` is a shorthand for one source; ``sources`` lists several with weights (weights need
    ``resampled: true``). A batch holds at most ``batch_tokens`` LM tokens: visual plus text.
    """

    train: str = ""
    sources: list[SourceConfig] = field(default_factory=list)
    resampled: bool = False
    val: str | None = None
    prompt: str = "<image>"
    prompt_field: str | None = None
    target_field: str = "text"
    group_field: str | None = None
    max_text_length: int = 64
    batch_tokens: int = 4608
    max_batch_size: int = 32
    buckets: bool = True
    pool_size: int = 512
    max_wait: int = 64
    fast_decode: bool = True
    val_samples: int = 32
    num_workers: int = 2
    max_image_pixels: int = 64_000_000
    max_consecutive_failures: int = 1000


@dataclass
class DeepSpeedConfig:
    """ZeRO settings for ``trainer.strategy: deepspeed``; the DeepSpeed config is generated from these."""

    stage: int = 2
    offload_optimizer: bool = False
    offload_parameters: bool = False


@dataclass
class TrainerConfig:
    """What Lightning's Trainer is given. ``devices`` and ``num_nodes`` left at ``auto`` come from the
    launcher's environment (torchrun, SLURM) or the machine."""

    max_steps: int = 1000
    val_every: int = 250
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    precision: str = "32-true"
    accelerator: str = "auto"
    strategy: str = "auto"
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    devices: str = "auto"
    num_nodes: str = "auto"
    accumulate_grad_batches: int = 1
    deterministic: bool = False


@dataclass
class WandbConfig:
    project: str = "vlmtrain"
    entity: str | None = None
    offline: bool = True
    tags: list[str] = field(default_factory=list)


@dataclass
class Recipe:
    """One training run, all of it."""

    name: str = "run"
    seed: int = 0
    run_dir: str = "runs/${name}"
    overwrite: bool = False
    resume: str | None = None
    logger: str = "wandb"
    wandb: WandbConfig = field(default_factory=WandbConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, merge and validate a recipe; raise :class:`RecipeError` on the first problem."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r} not found")
    try:
        yaml = OmegaConf.load(path)
    except Exception as error:  # YAML syntax errors come from several libraries
        raise RecipeError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(yaml, DictConfig):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys to values")
    return recipe_from_configs([yaml, _parse_overrides(overrides)], source=str(path))


def recipe_from_configs(configs: list[DictConfig], source: str = "recipe") -> Recipe:
    """Merge ``configs`` over the schema defaults, resolve interpolations and validate."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Recipe), *configs)
        OmegaConf.resolve(merged)
        recipe = OmegaConf.to_object(merged)
    except oc_errors.ConfigKeyError as error:
        raise RecipeError(f"{source}: {_unknown_key_message(error)}") from None
    except (oc_errors.ValidationError, oc_errors.InterpolationResolutionError) as error:
        key = getattr(error, "full_key", None) or "?"
        raise RecipeError(f"{source}: {key}: {_first_line(error)}") from None
    validate(recipe, source)
    return recipe


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML: written next to every run so it can be re-run exactly."""
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def _parse_overrides(overrides: list[str] | tuple[str, ...]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like key=value, e.g. trainer.max_steps=100")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as error:
        raise RecipeError(f"overrides: {_first_line(error)}") from None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _unknown_key_message(error: oc_errors.ConfigKeyError) -> str:
    full_key = getattr(error, "full_key", None) or getattr(error, "key", "?")
    parent, _, leaf = str(full_key).rpartition(".")
    valid = _schema_keys(parent)
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else (f"; valid keys: {', '.join(valid)}" if valid else "")
    return f"{full_key}: unknown key{hint}"


def _schema_keys(dotted: str) -> list[str]:
    """Field names of the schema node at ``dotted`` ('' is the root)."""
    node: Any = Recipe
    for part in filter(None, dotted.split(".")):
        matches = [f for f in fields(node) if f.name == part] if is_dataclass(node) else []
        if not matches:
            return []
        node = _dataclass_of(node, matches[0].name)
    return [f.name for f in fields(node)] if is_dataclass(node) else []


def _dataclass_of(parent: Any, name: str) -> Any:
    value = getattr(parent(), name)
    return type(value) if is_dataclass(value) else None


def _fail(source: str, key: str, message: str) -> None:
    raise RecipeError(f"{source}: {key}: {message}")


def _check_choice(source: str, key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        _fail(source, key, f"{value!r} is not one of {', '.join(choices)}{hint}")


def _check_positive(source: str, key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        _fail(source, key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(recipe: Recipe, source: str = "recipe") -> None:
    """Cross-field checks of a recipe; all rules live here."""
    allowed = ", ".join(str(level) for level in LEVELS)
    budget = recipe.budget
    if not budget.levels:
        _fail(source, "budget.levels", f"must list at least one of {allowed}")
    for i, level in enumerate(budget.levels):
        if level not in LEVELS:
            nearest = min(LEVELS, key=lambda allowed_level: abs(math.log(allowed_level / max(level, 1))))  # levels double
            _fail(source, f"budget.levels[{i}]", f"{level} is not a token level; allowed: {allowed} (nearest: {nearest})")
    if len(set(budget.levels)) != len(budget.levels):
        _fail(source, "budget.levels", f"lists a level twice: {budget.levels}")
    if budget.weights is not None:
        if len(budget.weights) != len(budget.levels):
            _fail(source, "budget.weights", f"has {len(budget.weights)} entries for {len(budget.levels)} levels")
        if any(w < 0 for w in budget.weights) or sum(budget.weights) <= 0:
            _fail(source, "budget.weights", f"must be >= 0 with a positive sum, got {budget.weights}")
    _check_choice(source, "budget.mode", budget.mode, ("sample", "matryoshka"))
    if budget.default not in budget.levels:
        _fail(source, "budget.default", f"{budget.default} is not in budget.levels {budget.levels}")

    vision = recipe.model.vision
    _check_choice(source, "model.vision.backbone", vision.backbone, BACKBONES)
    if vision.backbone == "native":
        if vision.hf_config:
            _fail(source, "model.vision.hf_config", "the native backbone is built from the recipe; hf_config is for HF backbones")
        if vision.path is not None and not vision.path.endswith(".safetensors"):
            _fail(source, "model.vision.path", f"{vision.path!r}: the native backbone loads a .safetensors file of its weights")
        if vision.patch_size is None:
            _fail(source, "model.vision.patch_size", "the native backbone needs a patch size")
        _check_choice(source, "model.vision.stem", vision.stem, STEMS)
        if vision.stem == "conv" and vision.patch_size & (vision.patch_size - 1):
            _fail(source, "model.vision.patch_size", f"{vision.patch_size}: the conv stem needs a power of two (or stem: linear)")
        if vision.width % vision.heads or (vision.width // vision.heads) % 4:
            _fail(source, "model.vision.width", f"{vision.width} must split into {vision.heads} heads of a size divisible by 4 (2-D RoPE)")
    elif vision.path is None and not vision.hf_config:
        _fail(source, "model.vision.path", f"backbone {vision.backbone!r} needs a local path or an hf_config")
    if vision.patch_size is not None:
        _check_positive(source, "model.vision.patch_size", vision.patch_size)

    pooling = recipe.model.pooling
    _check_choice(source, "model.pooling.kind", pooling.kind, POOLINGS)
    if pooling.size is not None:
        _check_positive(source, "model.pooling.size", pooling.size)
    elif vision.backbone != "gemma4":
        _fail(source, "model.pooling.size", f"backbone {vision.backbone!r} has no pool size of its own; set one (e.g. 2)")

    lm = recipe.model.lm
    if lm.path is None and "model_type" not in lm.hf_config:
        _fail(source, "model.lm.hf_config", "without model.lm.path it must hold a model_type (e.g. llama)")
    if not lm.image_token:
        _fail(source, "model.lm.image_token", "must not be empty")

    optim = recipe.optim
    parts = {"vision": optim.vision, "pooling": optim.pooling, "projector": optim.projector, "lm": optim.lm}
    for name, part in parts.items():
        _check_positive(source, f"optim.{name}.lr", part.lr, allow_zero=not part.trainable)
    if not any(part.trainable for part in parts.values()):
        _fail(source, "optim", "no part is trainable; set optim.<part>.trainable: true for at least one")
    _check_choice(source, "optim.schedule", optim.schedule, LR_SCHEDULES)
    if len(optim.betas) != 2 or not all(0 <= b < 1 for b in optim.betas):
        _fail(source, "optim.betas", f"must be two numbers in [0, 1), got {optim.betas}")
    _check_positive(source, "optim.warmup_steps", optim.warmup_steps, allow_zero=True)
    _check_positive(source, "optim.grad_clip", optim.grad_clip, allow_zero=True)
    _check_positive(source, "optim.weight_decay", optim.weight_decay, allow_zero=True)

    data = recipe.data
    if bool(data.train) == bool(data.sources):
        _fail(source, "data.train", "give either data.train (one shard spec) or data.sources (specs with weights), not both or neither")
    for i, entry in enumerate(data.sources):
        if not entry.spec:
            _fail(source, f"data.sources[{i}].spec", "needs a shard spec")
        _check_positive(source, f"data.sources[{i}].weight", entry.weight)
    if not data.resampled and any(entry.weight != 1.0 for entry in data.sources):
        _fail(source, "data.sources", "weights need data.resampled: true (in order, every shard is read once per epoch)")
    if data.prompt_field is None and data.prompt.count(lm.image_token) == 0:
        _fail(source, "data.prompt", f"must contain the image marker {lm.image_token!r}")
    one_sample = (sum(budget.levels) if budget.mode == "matryoshka" else max(budget.levels)) + data.max_text_length * (
        len(budget.levels) if budget.mode == "matryoshka" else 1
    )
    if data.batch_tokens < one_sample:
        _fail(source, "data.batch_tokens", f"{data.batch_tokens} cannot hold one image at the largest budget plus max_text_length ({one_sample})")
    for key in ("max_text_length", "max_batch_size", "val_samples", "pool_size", "max_wait", "max_image_pixels", "max_consecutive_failures"):
        _check_positive(source, f"data.{key}", getattr(data, key))
    _check_positive(source, "data.num_workers", data.num_workers, allow_zero=True)

    trainer = recipe.trainer
    for key in ("max_steps", "val_every", "log_every", "checkpoint_every", "keep_checkpoints", "accumulate_grad_batches"):
        _check_positive(source, f"trainer.{key}", getattr(trainer, key))
    for key in ("devices", "num_nodes"):
        value = getattr(trainer, key)
        if value != "auto" and not (value.isdigit() and int(value) > 0):
            _fail(source, f"trainer.{key}", f"{value!r} must be auto or a positive number")
    _check_choice(source, "trainer.precision", trainer.precision, PRECISIONS)
    _check_choice(source, "trainer.strategy", trainer.strategy, STRATEGIES)
    if trainer.deepspeed.stage not in (2, 3):
        _fail(source, "trainer.deepspeed.stage", f"{trainer.deepspeed.stage} is not a ZeRO stage this framework runs; choose 2 or 3")
    if trainer.deepspeed.offload_parameters and trainer.deepspeed.stage != 3:
        _fail(source, "trainer.deepspeed.offload_parameters", "needs ZeRO stage 3")
    lora = lm.lora
    if lora.rank < 0 or lora.alpha <= 0 or not 0 <= lora.dropout < 1 or (lora.rank and not lora.target_modules):
        _fail(source, "model.lm.lora", f"rank >= 0, alpha > 0, dropout in [0, 1) and target modules are needed, got {lora}")
    if lora.rank and not optim.lm.trainable:
        _fail(source, "model.lm.lora.rank", "LoRA adapters need optim.lm.trainable: true (only the adapters then train)")
    _check_choice(source, "logger", recipe.logger, LOGGERS)
    if recipe.resume is not None and recipe.overwrite:
        _fail(source, "resume", "cannot resume and overwrite at once")
    if not recipe.name or "/" in recipe.name:
        _fail(source, "name", f"{recipe.name!r} must be a non-empty name without '/'")
