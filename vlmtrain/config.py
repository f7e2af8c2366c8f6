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
import os
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf import errors as oc_errors

from vlmtrain.budget import BudgetConfig, BudgetSchedule, check_budget_settings
from vlmtrain.data.config import DataConfig, check_data
from vlmtrain.errors import UserError
from vlmtrain.model.config import ModelConfig, check_model
from vlmtrain.modeling.backbones import BACKBONES
from vlmtrain.modeling.errors import InvalidSetting, one_of, positive, require
from vlmtrain.text.chat import NAMED_TEMPLATES

LOGGERS = ("wandb", "csv", "none")
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed")
LR_SCHEDULES = ("cosine", "constant")
STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed")


class RecipeError(UserError, ValueError):
    """A recipe that cannot run: unknown key, wrong type or invalid value. The message is one line."""


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
class DeepSpeedConfig:
    """ZeRO settings for ``trainer.strategy: deepspeed``; the DeepSpeed config is generated from these, with the
    DeepSpeed JSON file ``config`` (if any) laid over it (vlmtrain/train/deepspeed_config.py)."""

    stage: int = 2
    offload_optimizer: bool = False
    offload_parameters: bool = False
    config: str | None = None


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
    compile: bool = False  # torch.compile each LM layer (dynamic shapes; attention eager): vlmtrain/train/compile.py
    stop_within: float = 25.0  # seconds from a stop signal to exit, when no step can end (SLURM, Kubernetes kill at 30)


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
    them out of run directories and W&B (they may hold secrets). With ``model.checkpoint``, its family's values
    come first (:func:`vlmtrain.families.checkpoint_recipe`): what the recipe sets itself wins."""
    configs = [*_checkpoint_values(configs, source), *configs]
    recipe = structured(Recipe, configs, source)
    try:
        raw = OmegaConf.to_container(OmegaConf.merge(schema_defaults(Recipe), *configs), resolve=False)
    except oc_errors.OmegaConfBaseException:
        raw = {}
    recipe._from_environment = {key: value for key, value in _leaves(raw) if isinstance(value, str) and "${oc.env:" in value}
    validate(recipe, source)
    return recipe


def _checkpoint_values(configs: list[DictConfig], source: str) -> list[DictConfig]:
    """The values a ``model.checkpoint`` folder brings (none without one)."""
    try:
        path = OmegaConf.select(OmegaConf.merge(*configs), "model.checkpoint")
    except oc_errors.OmegaConfBaseException:
        return []  # the schema names the mistake
    if path is None:
        return []
    if not Path(str(path)).is_dir():
        raise RecipeError(f"{source}: model.checkpoint: {str(path)!r} is not a folder (a local Hugging Face model)")
    from vlmtrain.families import checkpoint_recipe

    try:
        return [OmegaConf.create(checkpoint_recipe(str(path)))]
    except UserError as error:
        raise RecipeError(f"{source}: {error}") from None


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
        node, leaf = _parent(values, key)
        node[leaf] = written
    return values


def _parent(values: dict[str, Any], key: str) -> tuple[Any, str | int]:
    """The container holding the dotted ``key`` (``a.b[2].c``) in nested ``values``, and its last part."""
    *path, leaf = [int(part) if part.isdigit() else part for part in key.replace("[", ".").replace("]", "").split(".")]
    node = values
    for part in path:
        node = node[part]
    return node, leaf


PATH_KEYS = ("run_dir", "resume", "model.vision.path", "model.lm.path", "model.lm.tokenizer", "model.lm.adapter",
             "trainer.deepspeed.config", "data.train", "data.val", "data.text.chat_template")
NOT_PATHS = ("auto", "byte")  # resume=auto; the byte tokenizer


def anchored_values(recipe: Recipe, base: Path) -> dict[str, Any]:
    """:func:`recipe_values` with every relative local path made absolute from ``base`` (the directory the run
    started in), so that a run directory's recipe works from anywhere; URLs, ``pipe:`` commands, a chat
    template's name or text, and values from the environment stay as written."""
    values = recipe_values(recipe)
    sources = [f"data.sources[{index}].spec" for index in range(len(recipe.data.sources))]
    from_environment = getattr(recipe, "_from_environment", {})
    for key in (*PATH_KEYS, *sources):
        node, leaf = _parent(values, key)
        value = node[leaf]
        template = key == "data.text.chat_template" and isinstance(value, str) and (value in NAMED_TEMPLATES or "{" in value)
        if key in from_environment or not isinstance(value, str) or not value or value in NOT_PATHS or template:
            continue
        node[leaf] = "::".join(_anchored(piece, base) for piece in value.split("::"))
    return values


def _anchored(path: str, base: Path) -> str:
    if path.startswith("pipe:") or "://" in path or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(base, path))


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
    """The resolved recipe as YAML (environment values as written, see :func:`recipe_values`)."""
    return OmegaConf.to_yaml(OmegaConf.create(recipe_values(recipe)))


def run_recipe_yaml(recipe: Recipe, started_in: Path) -> str:
    """The recipe as its run directory keeps it, to be re-run exactly from any directory: paths absolute
    (:func:`anchored_values`), ``overwrite`` off (a relaunch with ``resume=auto`` continues the run)."""
    return OmegaConf.to_yaml(OmegaConf.create({**anchored_values(recipe, started_in), "overwrite": False}))


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
        _check_model,
        _check_optim,
        _check_data,
        _check_trainer,
        _check_run,
        _check_across,
    )
    try:
        for check in checks:
            check(recipe)
    except InvalidSetting as problem:
        raise RecipeError(f"{source}: {problem}") from None


def _check_budget(recipe: Recipe) -> None:
    budget = recipe.budget
    try:
        check_budget_settings(budget.levels, budget.weights, budget.mode, budget.default, budget.per_image)
    except InvalidSetting as problem:
        raise problem.under("budget") from None


def _check_model(recipe: Recipe) -> None:
    try:
        check_model(recipe.model, recipe.budget.levels)
    except InvalidSetting as problem:
        raise problem.under("model") from None


def _check_data(recipe: Recipe) -> None:
    try:
        check_data(recipe.data)
    except InvalidSetting as problem:
        raise problem.under("data") from None


def _check_numbers(recipe: Recipe) -> None:
    for key, value in _numbers(recipe):
        require(math.isfinite(value), key, f"{value} is not a finite number")


def _check_optim(recipe: Recipe) -> None:
    optim = recipe.optim
    parts = {"vision": optim.vision, "pooling": optim.pooling, "projector": optim.projector, "lm": optim.lm}
    for name, part in parts.items():
        positive(f"optim.{name}.lr", part.lr, allow_zero=not part.trainable)
    require(
        any(part.trainable for part in parts.values()),
        "optim",
        "no part is trainable; set optim.<part>.trainable: true for at least one",
    )
    one_of("optim.schedule", optim.schedule, LR_SCHEDULES)
    require(
        len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas),
        "optim.betas",
        f"must be two numbers in [0, 1), got {optim.betas}",
    )
    for key in ("warmup_steps", "grad_clip", "weight_decay"):
        positive(f"optim.{key}", getattr(optim, key), allow_zero=True)
    require(0 <= optim.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {optim.min_lr_ratio}")


def _check_trainer(recipe: Recipe) -> None:
    trainer = recipe.trainer
    for key in ("max_steps", "val_every", "log_every", "checkpoint_every", "keep_checkpoints", "accumulate_grad_batches",
                "stop_within"):
        positive(f"trainer.{key}", getattr(trainer, key))
    for key in ("devices", "num_nodes"):
        value = getattr(trainer, key)
        require(
            value == "auto" or (value.isdigit() and int(value) > 0),
            f"trainer.{key}",
            f"{value!r} must be auto or a positive number",
        )
    one_of("trainer.precision", trainer.precision, PRECISIONS)
    one_of("trainer.strategy", trainer.strategy, STRATEGIES)
    require(
        trainer.deepspeed.stage in (2, 3),
        "trainer.deepspeed.stage",
        f"{trainer.deepspeed.stage} is not a ZeRO stage this framework runs; choose 2 or 3",
    )
    require(
        not trainer.deepspeed.offload_parameters or trainer.deepspeed.stage == 3,
        "trainer.deepspeed.offload_parameters",
        "needs ZeRO stage 3",
    )


def _check_run(recipe: Recipe) -> None:
    one_of("logger", recipe.logger, LOGGERS)
    require(bool(recipe.name) and "/" not in recipe.name, "name", f"{recipe.name!r} must be a non-empty name without '/'")
    require(recipe.resume is None or not recipe.overwrite, "resume", "cannot resume and overwrite at once")


def _check_across(recipe: Recipe) -> None:
    """The rules that tie sections together."""
    model, data, budget = recipe.model, recipe.data, recipe.budget
    backbone = BACKBONES[model.vision.backbone]
    require(
        model.pooling.size is not None or backbone.may_have_own_pool(),
        "model.pooling.size",
        f"backbone {model.vision.backbone!r} has no pool size of its own; set one (e.g. 2)",
    )
    require(
        not model.lm.lora.rank or recipe.optim.lm.trainable,
        "model.lm.lora.rank",
        "LoRA adapters need optim.lm.trainable: true (only the adapters then train)",
    )
    for key in ("offload_optimizer", "config"):
        require(
            recipe.trainer.strategy == "deepspeed" or not getattr(recipe.trainer.deepspeed, key),
            f"trainer.deepspeed.{key}",
            "needs trainer.strategy: deepspeed",
        )
    strategy = recipe.trainer.strategy
    sharded = strategy == "fsdp" or (strategy == "deepspeed" and recipe.trainer.deepspeed.stage == 3)
    require(
        model.lm.quantization is None or strategy in ("auto", "ddp"),
        "model.lm.quantization",
        f"a 4-bit LM trains with trainer.strategy auto or ddp, not {strategy} (its 4-bit weights are not sharded)",
    )
    require(
        not recipe.trainer.compile or strategy in ("auto", "ddp", "fsdp"),
        "trainer.compile",
        f"is tested with trainer.strategy auto, ddp and fsdp, not {strategy}",
    )
    one_grid = not data.batching.packing and data.batching.buckets and budget.per_image == "shared"
    require(
        not (sharded and backbone.runs_per_grid) or one_grid,
        "data.batching.packing",
        "DINOv2 runs once per image grid, and with sharded weights (ZeRO-3, FSDP) every rank must run it equally often: "
        "set data.batching.packing: "
        "false (one aspect bucket per step) and budget.per_image: shared",
    )
    require(
        data.text.prompt_field is not None or model.lm.image_token in data.text.prompt,
        "data.text.prompt",
        f"must contain the image marker {model.lm.image_token!r}",
    )
    one_sample = BudgetSchedule.of(budget, recipe.seed).largest_cost(lambda level: level, data.text.max_length)
    require(
        data.batching.batch_tokens >= one_sample,
        "data.batching.batch_tokens",
        f"{data.batching.batch_tokens} cannot hold one image at the largest budget plus data.text.max_length ({one_sample})",
    )
