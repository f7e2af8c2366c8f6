"""The run plan: what a recipe decides before anything is built, made once and handed to the model side and
the data side alike: the model description (and so the geometry), what the model starts from, the budget
schedule, the tokenizer and how the model's family writes a video's frames."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from vlmtrain.budget import BudgetSchedule
from vlmtrain.config import Recipe
from vlmtrain.families import frame_layout
from vlmtrain.model.description import ModelDescription, Start, describe_model
from vlmtrain.model.lm import lm_tokenizer
from vlmtrain.modeling.geometry import Geometry
from vlmtrain.modeling.prompt import FrameLayout
from vlmtrain.text.chat import resolve_chat_template


@dataclass(frozen=True)
class RunPlan:
    """One recipe's plan (see the module docstring)."""

    recipe: Recipe
    model: ModelDescription
    start: Start
    geometry: Geometry
    schedule: BudgetSchedule
    tokenizer: PreTrainedTokenizerBase
    frames: FrameLayout


def plan_run(recipe: Recipe) -> RunPlan:
    """The plan of ``recipe`` (reads local config and tokenizer files, no weights). A chat template the
    recipe gives becomes the tokenizer's own, so that the run's tokenizer and every export carry it."""
    model = describe_model(recipe.model, recipe.budget)
    tokenizer = lm_tokenizer(recipe.model.lm)
    template = resolve_chat_template(recipe.data.text.chat_template)
    if template is not None:
        tokenizer.chat_template = template
    schedule = BudgetSchedule.of(recipe.budget, recipe.seed)
    frames = frame_layout(model, tokenizer)
    return RunPlan(recipe, model, Start.of(recipe.model), model.geometry(), schedule, tokenizer, frames)
