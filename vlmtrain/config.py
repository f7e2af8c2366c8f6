"""Recipes: YAML files read by OmegaConf over a typed dataclass tree, validated before any heavy work.

``load_recipe(path, overrides)`` merges schema defaults, the YAML file and ``key=value`` overrides,
converts the result back into :class:`Recipe` objects (:func:`structured`, which also reads other typed
JSON such as an export's model description) and checks the rules of each section, then the rules across
sections, in :func:`validate`. Every problem raises :class:`RecipeError` whose message is one line naming
the key.
"""

from __future__ import annotations

import copy
import difflib
import functools
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf import errors as oc_errors

from vlmtrain.budget import BudgetSchedule, check_budget_settings
from vlmtrain.errors import UserError
from vlmtrain.modeling.geometry import LEVELS, BudgetError, Geometry

BACKBONES = ("native", "siglip2", "gemma4", "dinov2")
STEMS = ("conv", "linear")
POOLINGS = ("average", "attention")
PROJECTORS = ("mlp", "gemma4")
LOGGERS = ("wandb", "csv", "none")
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed")
LR_SCHEDULES = ("cosine", "constant")
STRATEGIES = ("auto", "ddp", "deepspeed")
TRAIN_ON = ("all_assistant_turns", "last_assistant_turn")


class RecipeError(UserError, ValueError):
    """A recipe that cannot run: unknown key, wrong type or invalid value. The message is one line."""


@dataclass
class BudgetConfig:
    """Token budgets trained, their sampling weights, and the budget used when none is given (``default``
    null: 280, or the level nearest to it when the levels leave 280 out). ``per_image: shared`` gives all
    images of a batch its budget; ``independent`` draws each image's own. A budget fixed in a record wins."""

    levels: list[int] = field(default_factory=lambda: list(LEVELS))
    weights: list[float] | None = None
    mode: str = "sample"
    default: int | None = None
    per_image: str = "shared"


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
    """From the vision width to the language model's width: ``mlp`` (LayerNorm, then a two-layer GELU MLP of
    ``hidden_size``, default the LM's width) or ``gemma4`` (Gemma 4's embedder: RMSNorm without scale, then
    one linear map without bias; no hidden size)."""

    kind: str = "mlp"
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
    """A Hugging Face causal LM: from a local ``path``, or random weights from ``hf_config`` (needs model_type);
    new LoRA adapters (``lora``) or the PEFT adapter folder ``adapter`` on top."""

    path: str | None = None
    hf_config: dict[str, Any] | None = field(default_factory=dict)  # null clears it (a recipe switching to a path)
    tokenizer: str | None = None
    image_token: str = "<image>"
    attn_implementation: str = "vlmtrain_varlen"  # packed rows attend per sample (vlmtrain/modeling/attention.py)
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    adapter: str | None = None

    def __post_init__(self) -> None:
        if self.hf_config is None:
            self.hf_config = {}


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
class TextConfig:
    """How a sample becomes text. A prompt/target record: the prompt (its ``<image>`` markers place the
    images; literal text) or the record field holding it, and the record field holding the target. A
    conversation record (``messages``): the chat template (null: the tokenizer's own; ``chatml``; a file;
    Jinja text) and which assistant turns are trained on. For both: an optional field that groups
    validation results, and the longest text (without image tokens) a sample may have."""

    prompt: str = "<image>"
    prompt_field: str | None = None
    target_field: str = "text"
    group_field: str | None = None
    max_length: int = 64
    chat_template: str | None = None
    train_on: str = "all_assistant_turns"


@dataclass
class BatchingConfig:
    """A step holds at most ``batch_tokens`` LM tokens (visual plus text) and ``max_batch_size`` samples, chosen
    among ``lookahead`` samples read ahead; a sample waits at most ``max_wait`` steps. ``packing``: the samples
    of a step share rows of text (``row_tokens`` each; null: one row) and images of any grid and budget share
    the encoder's packed sequence, nothing padded. Without packing, a step holds one aspect bucket (when
    ``buckets``: images of one token grid) and pads its text to the longest sample."""

    batch_tokens: int = 4608
    max_batch_size: int = 32
    packing: bool = True
    row_tokens: int | None = None
    buckets: bool = True
    lookahead: int = 512
    max_wait: int = 64


@dataclass
class DecodingConfig:
    """``fast``: JPEGs decode at reduced scale when the budget needs far fewer pixels; larger images than
    ``max_image_pixels`` are skipped."""

    fast: bool = True
    max_image_pixels: int = 64_000_000


@dataclass
class DataConfig:
    """Where samples come from and how they become batches.

    ``train`` is a shorthand for one source; ``sources`` lists several with weights (weights need
    ``resampled: true``). More than ``max_consecutive_failures`` unusable samples in a row stop the run.
    """

    train: str = ""
    sources: list[SourceConfig] = field(default_factory=list)
    resampled: bool = False
    val: str | None = None
    val_samples: int = 32
    num_workers: int = 2
    max_consecutive_failures: int = 1000
    text: TextConfig = field(default_factory=TextConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)


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


RENAMED = {
    "data.prompt": "data.text.prompt",
    "data.prompt_field": "data.text.prompt_field",
    "data.target_field": "data.text.target_field",
    "data.group_field": "data.text.group_field",
    "data.max_text_length": "data.text.max_length",
    "data.batch_tokens": "data.batching.batch_tokens",
    "data.max_batch_size": "data.batching.max_batch_size",
    "data.buckets": "data.batching.buckets",
    "data.pool_size": "data.batching.lookahead",
    "data.max_wait": "data.batching.max_wait",
    "data.fast_decode": "data.decoding.fast",
    "data.train_on": "data.text.train_on",
    "data.chat_template": "data.text.chat_template",
    "data.max_image_pixels": "data.decoding.max_image_pixels",
}

Schema = TypeVar("Schema")


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
    """Merge ``configs`` over the schema defaults, resolve interpolations and validate. The values read from
    the environment (``${oc.env:VAR}``) are remembered as written, so that :func:`recipe_values` can keep
    them out of run directories and W&B (they may hold secrets)."""
    recipe = structured(Recipe, configs, source)
    try:
        raw = OmegaConf.to_container(OmegaConf.merge(schema_defaults(Recipe), *configs), resolve=False)
    except oc_errors.OmegaConfBaseException:
        raw = {}
    recipe._from_environment = {key: value for key, value in _leaves(raw) if isinstance(value, str) and "${oc.env:" in value}
    validate(recipe, source)
    return recipe


def _leaves(node: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a nested dict/list."""
    if isinstance(node, dict):
        for name, value in node.items():
            yield from _leaves(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaves(value, f"{key}[{index}]")
    else:
        yield key, node


def recipe_values(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain values, with what came from the environment written as it was in the recipe
    (``${oc.env:VAR}``), not its value: what run directories and W&B keep."""
    values = OmegaConf.to_container(OmegaConf.structured(recipe))
    for key, written in getattr(recipe, "_from_environment", {}).items():
        *path, leaf = [int(part) if part.isdigit() else part for part in key.replace("[", ".").replace("]", "").split(".")]
        node = values
        for part in path:
            node = node[part]
        node[leaf] = written
    return values


@functools.cache
def _schema_node(schema: type) -> DictConfig:
    return OmegaConf.structured(schema)


def schema_defaults(schema: type) -> DictConfig:
    """``OmegaConf.structured(schema)``, built once per schema and copied (building it is most of the cost
    of reading a recipe)."""
    return copy.deepcopy(_schema_node(schema))


def structured(schema: type[Schema], configs: list[Any], source: str, prefix: str = "") -> Schema:
    """``configs`` (mappings) merged over the dataclass ``schema``'s defaults, interpolations resolved, as
    ``schema`` objects; an unknown, renamed, missing or mistyped key raises :class:`RecipeError` naming it
    (after ``prefix``, where the values sit inside a larger file)."""
    try:
        merged = OmegaConf.merge(schema_defaults(schema), *configs)
        OmegaConf.resolve(merged)
        return OmegaConf.to_object(merged)
    except oc_errors.ConfigKeyError as error:
        raise RecipeError(f"{source}: {prefix}{_unknown_key_message(schema, error)}") from None
    except (oc_errors.ValidationError, oc_errors.InterpolationResolutionError, oc_errors.MissingMandatoryValue) as error:
        key = getattr(error, "full_key", None) or "?"
        raise RecipeError(f"{source}: {prefix}{key}: {_first_line(error)}") from None


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (environment values as written, see :func:`recipe_values`): written next to
    every run so it can be re-run exactly."""
    return OmegaConf.to_yaml(OmegaConf.create(recipe_values(recipe)))


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


def _unknown_key_message(schema: type, error: oc_errors.ConfigKeyError) -> str:
    full_key = str(getattr(error, "full_key", None) or getattr(error, "key", "?"))
    if schema is Recipe and full_key in RENAMED:
        return f"{full_key}: renamed to {RENAMED[full_key]}"
    parent, _, leaf = full_key.rpartition(".")
    valid = _schema_keys(schema, parent)
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else (f"; valid keys: {', '.join(valid)}" if valid else "")
    return f"{full_key}: unknown key{hint}"


def _schema_keys(schema: type, dotted: str) -> list[str]:
    """Field names of the schema node at ``dotted`` ('' is the root)."""
    node: Any = schema
    for part in filter(None, dotted.split(".")):
        node = _field_type(node, part) if is_dataclass(node) else None
    return [f.name for f in fields(node)] if is_dataclass(node) else []


def _field_type(cls: type, name: str) -> Any:
    """The dataclass type of field ``name`` of ``cls`` (``X | None`` unwrapped), or None."""
    hint = typing.get_type_hints(cls).get(name)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next((arg for arg in typing.get_args(hint) if arg is not type(None)), None)
    return hint if is_dataclass(hint) else None


class _Invalid(Exception):
    """A rule broken at ``key``; :func:`validate` turns it into a :class:`RecipeError`."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise _Invalid(key, message)


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    _require(value in choices, key, f"{value!r} is not one of {', '.join(choices)}{hint}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    _require(value > 0 or (allow_zero and value == 0), key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _numbers(node: Any, key: str = "") -> Iterator[tuple[str, float]]:
    """Every float in a recipe tree, with its dotted key."""
    if is_dataclass(node):
        for entry in fields(node):
            yield from _numbers(getattr(node, entry.name), f"{key}.{entry.name}" if key else entry.name)
    elif isinstance(node, dict):
        for name, value in node.items():
            yield from _numbers(value, f"{key}.{name}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _numbers(value, f"{key}[{index}]")
    elif isinstance(node, float):
        yield key, node


def validate(recipe: Recipe, source: str = "recipe") -> None:
    """Every rule of a recipe: those of each section, then those across sections."""
    checks = (
        _check_numbers,
        _check_budget,
        _check_vision,
        _check_pooling,
        _check_projector,
        _check_lm,
        _check_optim,
        _check_data,
        _check_trainer,
        _check_run,
        _check_across,
    )
    try:
        for check in checks:
            check(recipe)
    except _Invalid as problem:
        raise RecipeError(f"{source}: {problem.key}: {problem.message}") from None


def _check_numbers(recipe: Recipe) -> None:
    for key, value in _numbers(recipe):
        _require(math.isfinite(value), key, f"{value} is not a finite number")


def _check_budget(recipe: Recipe) -> None:
    budget = recipe.budget
    try:
        check_budget_settings(budget.levels, budget.weights, budget.mode, budget.default, budget.per_image)
    except BudgetError as error:
        raise _Invalid(f"budget.{error.key}", error.message) from None


def _check_vision(recipe: Recipe) -> None:
    vision = recipe.model.vision
    _choice("model.vision.backbone", vision.backbone, BACKBONES)
    if vision.patch_size is not None:
        _positive("model.vision.patch_size", vision.patch_size)
    if vision.backbone != "native":
        needs = f"backbone {vision.backbone!r} needs a local path or an hf_config"
        _require(vision.path is not None or bool(vision.hf_config), "model.vision.path", needs)
        return
    _require(
        not vision.hf_config,
        "model.vision.hf_config",
        "the native backbone is built from the recipe; hf_config is for HF backbones",
    )
    _require(
        vision.path is None or vision.path.endswith(".safetensors"),
        "model.vision.path",
        f"{vision.path!r}: the native backbone loads a .safetensors file of its weights",
    )
    _require(vision.patch_size is not None, "model.vision.patch_size", "the native backbone needs a patch size")
    _choice("model.vision.stem", vision.stem, STEMS)
    _require(
        vision.stem != "conv" or not vision.patch_size & (vision.patch_size - 1),
        "model.vision.patch_size",
        f"{vision.patch_size}: the conv stem needs a power of two (or stem: linear)",
    )
    for key in ("width", "depth", "heads", "mlp_ratio", "rope_theta"):
        _positive(f"model.vision.{key}", getattr(vision, key))
    _require(
        vision.width % vision.heads == 0 and (vision.width // vision.heads) % 4 == 0,
        "model.vision.width",
        f"{vision.width} must split into {vision.heads} heads of a size divisible by 4 (2-D RoPE)",
    )


def _check_pooling(recipe: Recipe) -> None:
    pooling = recipe.model.pooling
    _choice("model.pooling.kind", pooling.kind, POOLINGS)
    if pooling.size is not None:
        _positive("model.pooling.size", pooling.size)
    _positive("model.pooling.heads", pooling.heads)
    patch_size = recipe.model.vision.patch_size
    if pooling.size is not None and patch_size is not None and patch_size > 0:
        try:
            Geometry(patch_size, pooling.size, tuple(recipe.budget.levels))
        except BudgetError:
            pass  # the budget section names its own mistakes
        except UserError as error:
            raise _Invalid("model.pooling.size", str(error)) from None


def _check_projector(recipe: Recipe) -> None:
    projector = recipe.model.projector
    _choice("model.projector.kind", projector.kind, PROJECTORS)
    if projector.hidden_size is not None:
        _require(projector.kind == "mlp", "model.projector.hidden_size", f"the {projector.kind} projector has no hidden layer")
        _positive("model.projector.hidden_size", projector.hidden_size)


def _check_lm(recipe: Recipe) -> None:
    lm = recipe.model.lm
    _require(
        lm.path is not None or bool(lm.hf_config.get("model_type")),
        "model.lm.hf_config",
        "without model.lm.path it must hold a model_type (e.g. llama)",
    )
    _require(
        lm.path is None or not lm.hf_config,
        "model.lm.hf_config",
        "is not used when model.lm.path loads a model (its config comes from the folder); clear it: model.lm.hf_config=null",
    )
    _require(bool(lm.image_token), "model.lm.image_token", "must not be empty")
    lora = lm.lora
    _require(lora.rank >= 0, "model.lm.lora.rank", f"must be >= 0, got {lora.rank}")
    _positive("model.lm.lora.alpha", lora.alpha)
    _require(0 <= lora.dropout < 1, "model.lm.lora.dropout", f"must be in [0, 1), got {lora.dropout}")
    _require(not lora.rank or bool(lora.target_modules), "model.lm.lora.target_modules", "LoRA needs at least one target module")
    _require(
        not (lora.rank and lm.adapter),
        "model.lm.adapter",
        "give either new LoRA adapters (model.lm.lora.rank) or an adapter folder, not both",
    )


def _check_optim(recipe: Recipe) -> None:
    optim = recipe.optim
    parts = {"vision": optim.vision, "pooling": optim.pooling, "projector": optim.projector, "lm": optim.lm}
    for name, part in parts.items():
        _positive(f"optim.{name}.lr", part.lr, allow_zero=not part.trainable)
    _require(
        any(part.trainable for part in parts.values()),
        "optim",
        "no part is trainable; set optim.<part>.trainable: true for at least one",
    )
    _choice("optim.schedule", optim.schedule, LR_SCHEDULES)
    _require(
        len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas),
        "optim.betas",
        f"must be two numbers in [0, 1), got {optim.betas}",
    )
    for key in ("warmup_steps", "grad_clip", "weight_decay"):
        _positive(f"optim.{key}", getattr(optim, key), allow_zero=True)
    _require(0 <= optim.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {optim.min_lr_ratio}")


def _check_data(recipe: Recipe) -> None:
    data = recipe.data
    _require(
        bool(data.train) != bool(data.sources),
        "data.train",
        "give either data.train (one shard spec) or data.sources (specs with weights), not both or neither",
    )
    for i, entry in enumerate(data.sources):
        _require(bool(entry.spec), f"data.sources[{i}].spec", "needs a shard spec")
        _positive(f"data.sources[{i}].weight", entry.weight)
    _require(
        data.resampled or all(entry.weight == 1.0 for entry in data.sources),
        "data.sources",
        "weights need data.resampled: true (in order, every shard is read once per epoch)",
    )
    for key in ("val_samples", "max_consecutive_failures"):
        _positive(f"data.{key}", getattr(data, key))
    _positive("data.num_workers", data.num_workers, allow_zero=True)
    _positive("data.text.max_length", data.text.max_length)
    _choice("data.text.train_on", data.text.train_on, TRAIN_ON)
    for key in ("batch_tokens", "max_batch_size", "lookahead", "max_wait"):
        _positive(f"data.batching.{key}", getattr(data.batching, key))
    if data.batching.row_tokens is not None:
        _positive("data.batching.row_tokens", data.batching.row_tokens)
    _positive("data.decoding.max_image_pixels", data.decoding.max_image_pixels)


def _check_trainer(recipe: Recipe) -> None:
    trainer = recipe.trainer
    for key in ("max_steps", "val_every", "log_every", "checkpoint_every", "keep_checkpoints", "accumulate_grad_batches"):
        _positive(f"trainer.{key}", getattr(trainer, key))
    for key in ("devices", "num_nodes"):
        value = getattr(trainer, key)
        _require(
            value == "auto" or (value.isdigit() and int(value) > 0),
            f"trainer.{key}",
            f"{value!r} must be auto or a positive number",
        )
    _choice("trainer.precision", trainer.precision, PRECISIONS)
    _choice("trainer.strategy", trainer.strategy, STRATEGIES)
    _require(
        trainer.deepspeed.stage in (2, 3),
        "trainer.deepspeed.stage",
        f"{trainer.deepspeed.stage} is not a ZeRO stage this framework runs; choose 2 or 3",
    )
    _require(
        not trainer.deepspeed.offload_parameters or trainer.deepspeed.stage == 3,
        "trainer.deepspeed.offload_parameters",
        "needs ZeRO stage 3",
    )


def _check_run(recipe: Recipe) -> None:
    _choice("logger", recipe.logger, LOGGERS)
    _require(bool(recipe.name) and "/" not in recipe.name, "name", f"{recipe.name!r} must be a non-empty name without '/'")
    _require(recipe.resume is None or not recipe.overwrite, "resume", "cannot resume and overwrite at once")


def _check_across(recipe: Recipe) -> None:
    """The rules that tie sections together."""
    model, data, budget = recipe.model, recipe.data, recipe.budget
    _require(
        model.pooling.size is not None or model.vision.backbone == "gemma4",
        "model.pooling.size",
        f"backbone {model.vision.backbone!r} has no pool size of its own; set one (e.g. 2)",
    )
    _require(
        not model.lm.lora.rank or recipe.optim.lm.trainable,
        "model.lm.lora.rank",
        "LoRA adapters need optim.lm.trainable: true (only the adapters then train)",
    )
    _require(
        recipe.trainer.strategy == "deepspeed" or not recipe.trainer.deepspeed.offload_optimizer,
        "trainer.deepspeed.offload_optimizer",
        "needs trainer.strategy: deepspeed",
    )
    zero3 = recipe.trainer.strategy == "deepspeed" and recipe.trainer.deepspeed.stage == 3
    one_grid = not data.batching.packing and data.batching.buckets and budget.per_image == "shared"
    _require(
        not (zero3 and model.vision.backbone == "dinov2") or one_grid,
        "data.batching.packing",
        "DINOv2 runs once per image grid, and under ZeRO-3 every rank must run it equally often: set data.batching.packing: "
        "false (one aspect bucket per step) and budget.per_image: shared",
    )
    _require(
        data.text.prompt_field is not None or model.lm.image_token in data.text.prompt,
        "data.text.prompt",
        f"must contain the image marker {model.lm.image_token!r}",
    )
    one_sample = BudgetSchedule.of(budget, recipe.seed).largest_cost(lambda level: level, data.text.max_length)
    _require(
        data.batching.batch_tokens >= one_sample,
        "data.batching.batch_tokens",
        f"{data.batching.batch_tokens} cannot hold one image at the largest budget plus data.text.max_length ({one_sample})",
    )
