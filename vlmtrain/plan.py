"""The run plan: what a recipe decides before anything is built, made once and handed to the model side and
the data side alike: the model description (and so the geometry), the budget schedule and the tokenizer."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from vlmtrain.budget import BudgetSchedule
from vlmtrain.config import Recipe
from vlmtrain.geometry import Geometry
from vlmtrain.model.description import ModelDescription, describe_model
from vlmtrain.model.lm import lm_tokenizer


@dataclass(frozen=True)
class RunPlan:
    """One recipe's plan (see the module docstring)."""

    recipe: Recipe
    model: ModelDescription
    geometry: Geometry
    schedule: BudgetSchedule
    tokenizer: PreTrainedTokenizerBase


def budget_schedule(recipe: Recipe) -> BudgetSchedule:
    """The recipe's budget schedule (uniform weights unless given)."""
    budget = recipe.budget
    weights = tuple(budget.weights) if budget.weights is not None else (1.0,) * len(budget.levels)
    return BudgetSchedule(levels=tuple(budget.levels), weights=weights, seed=recipe.seed, mode=budget.mode)


def plan_run(recipe: Recipe) -> RunPlan:
    """The plan of ``recipe`` (reads local config and tokenizer files, no weights)."""
    model = describe_model(recipe.model, recipe.budget)
    return RunPlan(recipe, model, model.geometry(), budget_schedule(recipe), lm_tokenizer(recipe.model.lm))
