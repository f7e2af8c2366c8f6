"""Checks of a run that need more than the recipe but less than the model, done in seconds before anything is
built: HF config keys, devices, shards (:func:`check_recipe`, before the training stack is even imported),
then the records' fields, LoRA targets and the resume checkpoint (:func:`check_plan`). Each failure is one
line naming the key (:class:`~vlmtrain.config.RecipeError`)."""

from __future__ import annotations

import difflib
import logging
import os
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlmtrain.config import Recipe, RecipeError
from vlmtrain.data.samples import RawSample, SampleError
from vlmtrain.data.sources import expand_shards, read_shard
from vlmtrain.data.video import frame_budgets
from vlmtrain.model.config import LoraConfig
from vlmtrain.modeling.backbones import BACKBONES, TowerKind
from vlmtrain.modeling.geometry import BudgetError
from vlmtrain.modeling.projector import build_projector
from vlmtrain.train.deepspeed_config import read_user_config
from vlmtrain.train.layout import TRAINED, resume_checkpoint
from vlmtrain.weights import open_weights

if TYPE_CHECKING:  # the plan's modules are heavy; the recipe checks run before anything heavy is imported
    from vlmtrain.budget import BudgetSchedule
    from vlmtrain.data.builder import BatchBuilder
    from vlmtrain.plan import RunPlan

log = logging.getLogger(__name__)
PEEK = 8  # records read from the first shard to check the fields the recipe reads


def prepare(recipe: Recipe, source: str = "recipe") -> tuple[RunPlan, Path | None]:
    """Everything before the model is built, in seconds: the checks, the plan, and the Lightning state the
    run resumes from (None: a fresh start). Imports nothing of the training stack (Lightning, DeepSpeed)."""
    from vlmtrain.plan import plan_run

    check_recipe(recipe, source)
    checkpoint = resume_checkpoint(recipe)
    plan = plan_run(recipe)
    check_plan(plan, source, checkpoint)
    return plan, checkpoint


def check_recipe(recipe: Recipe, source: str) -> None:
    """What can be checked before the run is planned: local paths, HF config keys, devices, shards, a DeepSpeed
    config file."""
    check_paths(recipe, source)
    check_hf_configs(recipe, source)
    check_devices(recipe, source)
    if recipe.trainer.deepspeed.config:
        try:
            read_user_config(recipe)
        except RecipeError as error:
            raise RecipeError(f"{source}: {error}") from None
    check_shards(recipe, source)


def check_plan(plan: RunPlan, source: str, checkpoint: Path | None = None) -> None:
    """What can be checked once the run is planned (tokenizer and configs read), before the model is built;
    ``checkpoint``: the Lightning state the run resumes from."""
    check_records(plan, source)
    check_lora_targets(plan, source)
    check_resume(plan, source, checkpoint)


def _fail(source: str, key: str, message: str) -> None:
    raise RecipeError(f"{source}: {key}: {message}")


def config_keys(config_class: type) -> set[str]:
    """The keys a transformers config class takes: its attributes, their aliases, its arguments."""
    import inspect

    instance = config_class()
    return (
        set(instance.to_dict())
        | set(getattr(config_class, "attribute_map", {}))
        | set(inspect.signature(config_class.__init__).parameters)
    )


def consumed_by(config_class: type, name: str, value: Any) -> bool:
    """Whether ``config_class`` reads the undeclared key ``name`` itself (Gemma 4's ``global_head_dim``
    goes into its per-layer settings): a key it does not read stays behind as a plain attribute."""
    try:
        return not hasattr(config_class(**{name: value}), name)
    except Exception:  # read, and refused: the model's build says why
        return True


def _unknown_keys(source: str, key: str, values: dict[str, Any], config_class: type) -> None:
    valid = config_keys(config_class)
    for name in sorted(values):
        if name not in valid and not consumed_by(config_class, name, values[name]):
            close = difflib.get_close_matches(name, sorted(valid), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            _fail(source, f"{key}.{name}", f"not a key of {config_class.__name__}{hint}")


def check_paths(recipe: Recipe, source: str) -> None:
    """The folders and files the recipe names exist (models come from local paths only)."""
    model = recipe.model
    for key, path in (
        ("model.lm.path", model.lm.path),
        ("model.lm.tokenizer", model.lm.tokenizer),
        ("model.lm.adapter", model.lm.adapter),
    ):
        if path is not None and path != "byte" and not Path(path).is_dir():
            _fail(source, key, f"{path!r} is not a folder (a local Hugging Face model; nothing is downloaded)")
    vision = model.vision
    if vision.path is not None and not Path(vision.path).exists():
        _fail(source, "model.vision.path", f"{vision.path!r} not found (only local paths are read)")


def check_hf_configs(recipe: Recipe, source: str) -> None:
    """Every key of ``model.lm.hf_config`` and ``model.vision.hf_config`` is one its config class knows; an
    unknown ``model_type`` names the closest ones."""
    from transformers import CONFIG_MAPPING

    lm = recipe.model.lm
    if lm.hf_config:
        model_type = lm.hf_config["model_type"]
        if model_type not in CONFIG_MAPPING:
            close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3, cutoff=0.6)
            hint = f"; close: {', '.join(close)}" if close else ""
            _fail(source, "model.lm.hf_config.model_type", f"{model_type!r} is not a transformers model type{hint}")
        config_class = CONFIG_MAPPING[model_type]
        overrides = {k: v for k, v in lm.hf_config.items() if k != "model_type"}
        _unknown_keys(source, "model.lm.hf_config", overrides, config_class)
    vision = recipe.model.vision
    kind = BACKBONES[vision.backbone]
    if vision.hf_config and isinstance(kind, TowerKind):  # the native ViT takes no hf_config (the recipe rules)
        _unknown_keys(source, "model.vision.hf_config", vision.hf_config, kind.spec.config_class)


def check_devices(recipe: Recipe, source: str) -> None:
    """No more processes than the machine has devices (cores on CPU), and a GPU when one is asked for."""
    trainer = recipe.trainer
    wants_gpu = trainer.accelerator in ("gpu", "cuda")
    if wants_gpu and not torch.cuda.is_available():
        _fail(source, "trainer.accelerator", f"{trainer.accelerator}, but no CUDA GPU is visible on this machine")
    if trainer.devices == "auto":
        return
    devices = int(trainer.devices)
    on_gpu = wants_gpu or (trainer.accelerator == "auto" and torch.cuda.is_available())
    available = torch.cuda.device_count() if on_gpu else (os.cpu_count() or 1)
    if devices > available:
        kind = "GPUs" if on_gpu else "CPU cores"
        _fail(source, "trainer.devices", f"{devices} processes, but this machine has {available} {kind}")


def _specs(recipe: Recipe) -> list[tuple[str, str]]:
    data = recipe.data
    specs = (
        [("data.train", data.train)] if data.train else [(f"data.sources[{i}].spec", s.spec) for i, s in enumerate(data.sources)]
    )
    return specs + ([("data.val", data.val)] if data.val else [])


def check_shards(recipe: Recipe, source: str) -> None:
    """Every local shard the recipe names exists."""
    for key, spec in _specs(recipe):
        try:
            expand_shards(spec)
        except FileNotFoundError as error:
            _fail(source, key, str(error))


def check_records(plan: RunPlan, source: str) -> None:
    """The first records of the first local training shard have what the recipe reads: the target (and
    prompt) field of prompt/target records, a chat template for conversations; and texts that
    ``data.text.max_length`` lets through."""
    recipe = plan.recipe
    key, spec = _specs(recipe)[0]
    url = expand_shards(spec)[0]
    if url.startswith("pipe:") or "://" in url:
        return  # reading a remote shard here would cost what the loader pays anyway
    peeked = zip(read_shard(url, recipe.data.video, plan.frames), range(PEEK), strict=False)
    samples = [sample for sample, _ in peeked if isinstance(sample, RawSample)]
    text = recipe.data.text
    if any(s.messages is not None for s in samples) and plan.tokenizer.chat_template is None:
        _fail(
            source,
            "data.text.chat_template",
            f"{url} holds conversations and the tokenizer has no chat template; set one (chatml, a file, Jinja)",
        )
    records = [s.record for s in samples if s.messages is None]
    for field_key, name in (("data.text.target_field", text.target_field), ("data.text.prompt_field", text.prompt_field)):
        if name is not None and records and not any(isinstance(r.get(name), str) for r in records):
            fields = sorted({f for r in records for f in r if f != "images"})
            _fail(
                source,
                field_key,
                f"{name!r} is in none of the first {len(records)} records of {url} (their fields: {', '.join(fields)})",
            )
    sizes = sample_sizes(plan, samples)
    lengths = [text_tokens for text_tokens, _ in sizes]
    if lengths and min(lengths) > text.max_length:
        _fail(
            source,
            "data.text.max_length",
            f"{text.max_length}, but each of the first {len(lengths)} records of {url} has a longer text "
            f"({min(lengths)}-{max(lengths)} tokens): they would all be skipped; raise it",
        )
    totals = [total for text_tokens, total in sizes if text_tokens <= text.max_length]
    cap = recipe.data.batching.batch_tokens
    if totals and min(totals) > cap:
        _fail(
            source,
            "data.batching.batch_tokens",
            f"{cap}, but each of the first {len(totals)} records of {url} needs more LM tokens at the largest budget "
            f"({min(totals)}-{max(totals)}, images and text): they would all be skipped; raise it or lower budget.levels",
        )


def sample_sizes(plan: RunPlan, samples: list[RawSample]) -> list[tuple[int, int]]:
    """(text tokens, LM tokens at the schedule's largest budget) of each sample the run could encode: what
    ``data.text.max_length`` and ``data.batching.batch_tokens`` bound."""
    from vlmtrain.data.builder import BatchBuilder
    from vlmtrain.text.encoding import TextEncoder

    data = plan.recipe.data
    unbounded = replace(data.text, max_length=sys.maxsize)  # measured here, not refused
    text = TextEncoder(plan.tokenizer, plan.model.lm.image_token, plan.frames.token)
    builder = BatchBuilder(plan.geometry, text, unbounded, data.decoding, data.video, plan.frames)
    sizes = []
    for sample in samples:
        try:
            text_tokens = builder.text_tokens(sample)
            total = plan.schedule.largest_cost(partial(_visual_tokens, builder, plan.schedule, sample), text_tokens)
        except (SampleError, BudgetError):  # unusable for another reason, which the loader counts and reports
            continue
        sizes.append((text_tokens, total))
    return sizes


def _visual_tokens(builder: BatchBuilder, schedule: BudgetSchedule, sample: RawSample, budget: int) -> int:
    """The sample's visual tokens in a step at ``budget``, its images' fixed budgets kept and its frames' drawn (as
    training assigns them)."""
    fixed = frame_budgets(sample, builder.video, schedule, 0)
    return builder.visual_tokens(sample, schedule.image_budgets(0, sample.key, budget, fixed))



def linear_names(model: torch.nn.Module) -> list[str]:
    """The names of the linear layers of ``model``."""
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def check_lora_targets(plan: RunPlan, source: str) -> None:
    """Every LoRA target module (of the LM's, the vision encoder's and the projector's adapters) matches linear layers of its part
    the way PEFT matches them (the whole name or its ending); the error lists the layer names the part has. The
    parts are built on the meta device: no memory, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import vlmtrain.model.lm  # noqa: F401 (registers the causal LMs transformers lacks: Qwen-VL's text models)

    model, description = plan.recipe.model, plan.model
    if model.vision.lora.rank:
        with torch.device("meta"):
            backbone = BACKBONES[description.vision.kind].build(description.vision.settings)
        _check_targets(source, "model.vision.lora.target_modules", "vision encoder", linear_names(backbone), model.vision.lora)
    if model.projector.lora.rank:
        with torch.device("meta"):  # its layer names do not depend on the widths
            projector = build_projector(description.projector.kind, 8, description.projector.hidden_size, 8)
        _check_targets(source, "model.projector.lora.target_modules", "projector", linear_names(projector), model.projector.lora)
    lm = model.lm
    if lm.lora.rank:
        if lm.path is not None:
            config = AutoConfig.from_pretrained(lm.path, local_files_only=True).get_text_config()  # a whole VLM: its LM
        else:
            values = {k: v for k, v in lm.hf_config.items() if k != "model_type"}
            config = AutoConfig.for_model(lm.hf_config["model_type"], **{"vocab_size": len(plan.tokenizer), **values})
        with torch.device("meta"):
            names = linear_names(AutoModelForCausalLM.from_config(config))
        _check_targets(source, "model.lm.lora.target_modules", "LM", names, lm.lora)


def _check_targets(source: str, key: str, part: str, names: list[str], lora: LoraConfig) -> None:
    missing = [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        short = sorted({_short_name(name) for name in names})
        _fail(source, key, f"the {part} has no {', '.join(map(repr, missing))} layers; its linear layers: {', '.join(short)}")


def _short_name(name: str) -> str:
    """A layer's name as a LoRA target can give it: its last part, or its last two where the last is an index
    (``mlp.0``)."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def resume_log(checkpoint: Path | None, run_dir: Path, resume: str | None) -> None:
    """Say once where a run starts from."""
    if resume == "auto" and checkpoint is None:
        log.warning("resume=auto: no checkpoint in %s; the run starts from step 0", run_dir / "checkpoints")


SECTIONS = {
    "model.backbone.": "model.vision",
    "model.pooling.": "model.pooling",
    "model.projector.": "model.projector",
    "model.lm.": "model.lm (and its lora)",
}


def check_resume(plan: RunPlan, source: str, checkpoint: Path | None) -> None:
    """The checkpoint a run resumes from holds exactly the trained weights, in the shapes, of the model the
    recipe builds (compared on the meta device: nothing is loaded or allocated)."""
    if checkpoint is None or not (checkpoint.parent / TRAINED).is_file():
        return
    from vlmtrain.families import build_model
    from vlmtrain.train.optim import set_trainable

    with open_weights(checkpoint.parent / TRAINED) as handle:
        found = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    try:
        with torch.device("meta"), torch.random.fork_rng(devices=[]):  # shapes only: no start weights read
            model = build_model(plan.model, replace(plan.start, vision_weights=None), plan.tokenizer, plan.recipe.seed)
            set_trainable(model, plan.recipe.optim)
    except Exception:  # a part that cannot be built on the meta device: the load itself will tell
        return
    expected = {f"model.{name}": tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    for name in sorted(found.keys() | expected.keys()):
        if found.get(name) != expected.get(name):
            section = next((key for prefix, key in SECTIONS.items() if name.startswith(prefix)), "model")
            there = f"shape {found[name]}" if name in found else "absent"
            here = f"shape {expected[name]}" if name in expected else "absent (or not trained)"
            _fail(
                source,
                "resume",
                f"{checkpoint.parent} does not fit the recipe: {name} is {there} there, {here} in the model "
                f"the recipe builds (check {section})",
            )
