"""The DeepSpeed config of a run: generated from the recipe (ZeRO stage, offloading, gradient clipping), or a
user's own DeepSpeed JSON file (``trainer.deepspeed.config``) laid over it, as peers take one. What the recipe
decides elsewhere (optimizer, schedule, precision, accumulation, batch size) is refused in the file in one
line; ``"auto"`` takes the recipe's value. Imports nothing heavy: pre-flight reads it before a run starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmtrain.config import Recipe, RecipeError

OWNED_BY_THE_RECIPE = {  # DeepSpeed keys the recipe decides, and where
    "optimizer": "the optim section",
    "scheduler": "the optim section (optim.schedule, optim.warmup_steps)",
    "fp16": "trainer.precision",
    "bf16": "trainer.precision",
    "amp": "trainer.precision",
    "gradient_accumulation_steps": "trainer.accumulate_grad_batches",
    "train_batch_size": "data.batching (token-capped batches)",
}


def generated_config(recipe: Recipe, pin_memory: bool) -> dict[str, Any]:
    """The DeepSpeed config the recipe's own keys describe (offloaded tensors in pinned memory when asked: on
    GPUs). Batch sizes vary per step (token-capped batches): DeepSpeed's micro-batch size only feeds its
    throughput log, so it is set to 1."""
    settings = recipe.trainer.deepspeed
    zero: dict[str, Any] = {
        "stage": settings.stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e7,
        "allgather_bucket_size": 5e7,
    }
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    if settings.offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}
    return {
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_clipping": recipe.optim.grad_clip,
        "steps_per_print": 10**9,
    }


def laid_over(base: dict[str, Any], mine: dict[str, Any]) -> dict[str, Any]:
    """``mine`` over ``base``, section by section; ``"auto"`` keeps the base's value (or leaves the key out)."""
    merged = dict(base)
    for key, value in mine.items():
        if value == "auto":
            continue
        merged[key] = laid_over(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def read_user_config(recipe: Recipe) -> dict[str, Any]:
    """The user's DeepSpeed JSON (``trainer.deepspeed.config``), checked against the recipe."""
    key = "trainer.deepspeed.config"
    path = Path(recipe.trainer.deepspeed.config)
    if not path.is_file():
        raise RecipeError(f"{key}: {str(path)!r} not found (a DeepSpeed JSON file)")
    try:
        values = json.loads(path.read_text())
    except ValueError as error:
        raise RecipeError(f"{key}: {path}: not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise RecipeError(f"{key}: {path}: a DeepSpeed config is a JSON object")
    for name, owner in OWNED_BY_THE_RECIPE.items():
        if values.get(name, "auto") != "auto":
            raise RecipeError(f"{key}: {path}: {name!r} is set by {owner}; remove it from the file (or write \"auto\")")
    stage = values.get("zero_optimization", {}).get("stage", "auto")
    if stage not in ("auto", recipe.trainer.deepspeed.stage):
        raise RecipeError(
            f"{key}: {path}: zero_optimization.stage is {stage}, trainer.deepspeed.stage is {recipe.trainer.deepspeed.stage}; "
            f"set trainer.deepspeed.stage={stage}"
        )
    return values


def deepspeed_config(recipe: Recipe, pin_memory: bool) -> dict[str, Any]:
    """The run's DeepSpeed config: the generated one, with the user's file laid over it when the recipe names one."""
    config = generated_config(recipe, pin_memory)
    return laid_over(config, read_user_config(recipe)) if recipe.trainer.deepspeed.config else config
