"""A run's model as training left it: its recipe's plan rebuilt (same seeds, same pretrained folders) and its
checkpoint's trained weights loaded, read from ``trained.safetensors`` (no pickle, no DeepSpeed); a QLoRA run's LM
at full precision under its adapters."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from vlmtrain.config import Recipe, load_recipe
from vlmtrain.errors import UserError
from vlmtrain.export.format import TextFormat
from vlmtrain.families import build_model
from vlmtrain.model.description import ModelDescription
from vlmtrain.modeling.vlm import VisionLanguageModel
from vlmtrain.plan import plan_run
from vlmtrain.train.layout import CHECKPOINTS, RECIPE_FILE, TRAINED, latest_checkpoint
from vlmtrain.train.optim import set_trainable
from vlmtrain.weights import read_weights


@dataclass
class TrainedModel:
    """A run's model with its checkpoint's weights, what an export writes beside it (tokenizer, description,
    text format), the run's recipe and its directory."""

    model: VisionLanguageModel
    tokenizer: PreTrainedTokenizerBase
    description: ModelDescription
    text_format: TextFormat
    recipe: Recipe
    run_dir: Path


def locate(source: Path) -> tuple[Path, Path]:
    """(run directory, checkpoint directory) of a run directory (its latest checkpoint) or a checkpoint."""
    if (source / RECIPE_FILE).is_file():
        checkpoint = latest_checkpoint(source / CHECKPOINTS)
        if checkpoint is None:
            raise UserError(f"{source}: the run has no complete checkpoint yet")
        return source, checkpoint
    if (source / TRAINED).is_file() and (source.parent.parent / RECIPE_FILE).is_file():
        return source.parent.parent, source
    raise UserError(f"{source}: neither a run directory (with recipe.yaml) nor one of its checkpoints")


def trained_model(source: Path) -> TrainedModel:
    """The model of a run directory (its latest checkpoint) or of a checkpoint, with its trained weights."""
    run_dir, checkpoint = locate(source)
    plan = plan_run(load_recipe(run_dir / RECIPE_FILE))
    # a 4-bit (QLoRA) LM's adapters go onto its full-precision weights, what an export merges them into and serves
    start = replace(plan.start, lm=replace(plan.start.lm, quantization=None))
    model = build_model(plan.model, start, plan.tokenizer, plan.recipe.seed)
    set_trainable(model, plan.recipe.optim)
    trained = {name.removeprefix("model."): tensor for name, tensor in read_weights(checkpoint / TRAINED).items()}
    expected = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    if set(trained) != expected:
        raise UserError(f"{checkpoint}: trained weights do not match the recipe's trainable parameters "
                        f"({len(set(trained) ^ expected)} differ, e.g. {sorted(set(trained) ^ expected)[:2]})")
    model.load_state_dict(trained, strict=False)
    return TrainedModel(model, plan.tokenizer, plan.model, TextFormat.of(plan.recipe.data.text), plan.recipe, run_dir)
