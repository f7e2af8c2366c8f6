"""Recipes: every shipped recipe validates; each kind of mistake gives one line naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from vlmtrain.config import Recipe, RecipeError, load_recipe, recipe_from_configs, recipe_to_yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
TINY = ROOT / "recipes" / "tiny.yaml"


def test_there_are_recipes():
    assert TINY in RECIPES and len(RECIPES) >= 2


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads_and_validates(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.name == path.stem
    # the resolved YAML written next to a run loads back to the same recipe
    assert recipe_from_configs([OmegaConf.create(recipe_to_yaml(recipe))]) == recipe


def test_overrides_apply_and_interpolate():
    recipe = load_recipe(TINY, ["trainer.max_steps=7", "name=other", "budget.levels=[70,140]", "budget.default=70"])
    assert recipe.trainer.max_steps == 7
    assert recipe.run_dir == "runs/other"
    assert recipe.budget.levels == [70, 140]


def error_of(overrides: list[str]) -> str:
    with pytest.raises(RecipeError) as caught:
        load_recipe(TINY, overrides)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.vison.width=3", "model.vison: unknown key; did you mean 'vision'?"),
        ("model.vision.widht=3", "model.vision.widht: unknown key; did you mean 'width'?"),
        ("trainer.max_step=3", "trainer.max_step: unknown key; did you mean 'max_steps'?"),
        ("optim.vision.lr=fast", "optim.vision.lr: Value 'fast' of type 'str' could not be converted to Float"),
        ("trainer.max_steps=ten", "trainer.max_steps: Value 'ten' of type 'str' could not be converted to Integer"),
        ("budget.levels=[70,100]", "budget.levels[1]: 100 is not a token level; allowed: 70, 140, 280, 560, 1120 (nearest: 140)"),
        ("budget.default=100", "budget.default: 100 is not in budget.levels"),
        ("budget.mode=random", "budget.mode: 'random' is not one of sample, matryoshka"),
        ("model.pooling.kind=avg", "model.pooling.kind: 'avg' is not one of average, attention"),
        ("model.vision.backbone=siglip", "model.vision.backbone: 'siglip' is not one of native, siglip2, gemma4, dinov2; did you mean 'siglip2'?"),
        ("logger=tensorboard", "logger: 'tensorboard' is not one of wandb, csv, none"),
        ("trainer.precision=bf16", "trainer.precision: 'bf16' is not one of"),
        ("data.prompt=Describe", "data.prompt: must contain the image marker '<image>'"),
        ("data.batch_tokens=500", "data.batch_tokens: 500 cannot hold one image at the largest budget plus max_text_length (1184)"),
        ("data.sources=[{spec: a.tar}]", "data.train: give either data.train (one shard spec) or data.sources"),
        ("optim.lm.lr=-1", "optim.lm.lr: must be > 0"),
        ("model.vision.path=weights.pt", "model.vision.path: 'weights.pt': the native backbone loads a .safetensors file"),
    ],
)
def test_bad_recipes_give_one_clear_line(override, expected):
    assert expected in error_of([override])


def test_every_part_frozen_is_refused():
    parts = ["vision", "pooling", "projector", "lm"]
    assert "no part is trainable" in error_of([f"optim.{part}.trainable=false" for part in parts])


def test_malformed_override_and_missing_file():
    assert "must look like key=value" in error_of(["trainer.max_steps"])
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(ROOT / "recipes" / "nope.yaml")


def test_yaml_typo_in_a_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("  pooling:\n    kind: average", "  poling:\n    kind: average"))
    with pytest.raises(RecipeError, match=r"model.poling: unknown key; did you mean 'pooling'\?"):
        load_recipe(bad)


def test_cli_prints_one_error_line_and_exits_2():
    result = subprocess.run(
        [sys.executable, "-m", "vlmtrain.cli", "validate", str(TINY), "budget.levels=[70,100]"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: {TINY}: budget.levels[1]: 100 is not a token level; allowed: 70, 140, 280, 560, 1120 (nearest: 140)"
    ]
