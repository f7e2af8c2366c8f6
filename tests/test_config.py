"""Recipes: every shipped recipe validates; each kind of mistake gives one line naming the key."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import RECIPES, ROOT, TINY
from omegaconf import OmegaConf

from vlmtrain.config import Recipe, RecipeError, load_recipe, recipe_from_configs, recipe_to_yaml


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


@pytest.mark.parametrize("levels, default", [([70, 140], 140), ([560, 1120], 560), ([70, 280, 1120], 280), ([1120], 1120)])
def test_a_narrowed_level_list_needs_no_default_of_its_own(levels, default):
    from vlmtrain.budget import default_budget

    recipe = load_recipe(TINY, [f"budget.levels={levels}"])
    assert recipe.budget.default is None and default_budget(recipe.budget.levels, recipe.budget.default) == default


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
        ("data.pool_size=8", "data.pool_size: renamed to data.batching.lookahead"),
        ("data.batch_tokens=8", "data.batch_tokens: renamed to data.batching.batch_tokens"),
        ("data.text.max_lenght=8", "data.text.max_lenght: unknown key; did you mean 'max_length'?"),
        ("optim.vision.lr=fast", "optim.vision.lr: Value 'fast' of type 'str' could not be converted to Float"),
        ("trainer.max_steps=ten", "trainer.max_steps: Value 'ten' of type 'str' could not be converted to Integer"),
        ("budget.levels=[70,100]", "budget.levels[1]: 100 is not a token level; allowed: 70, 140, 280, 560, 1120 (nearest: 140)"),
        ("budget.levels=[]", "budget.levels: must list at least one of 70, 140, 280, 560, 1120"),
        ("budget.levels=[70,70]", "budget.levels: lists a level twice: [70, 70]"),
        ("budget.default=100", "budget.default: 100 is not in budget.levels"),
        ("budget.weights=[1,2]", "budget.weights: has 2 entries for 5 levels"),
        ("budget.weights=[0,0,0,0,0]", "budget.weights: must be finite, >= 0, with a positive sum"),
        ("budget.weights=[1,1,-1,1,1]", "budget.weights: must be finite, >= 0, with a positive sum"),
        ("budget.weights=[.nan,1,1,1,1]", "budget.weights[0]: nan is not a finite number"),
        ("optim.lm.lr=.nan", "optim.lm.lr: nan is not a finite number"),
        ("optim.projector.lr=.inf", "optim.projector.lr: inf is not a finite number"),
        ("budget.mode=random", "budget.mode: 'random' is not one of sample, matryoshka"),
        ("model.pooling.kind=avg", "model.pooling.kind: 'avg' is not one of average, attention"),
        ("model.pooling.size=0", "model.pooling.size: must be > 0, got 0"),
        ("model.projector.kind=linear", "model.projector.kind: 'linear' is not one of mlp, gemma4"),
        (
            "model.vision.backbone=siglip",
            "model.vision.backbone: 'siglip' is not one of native, siglip2, gemma4, dinov2, qwen2_5_vl, qwen3_vl; "
            "did you mean 'siglip2'?",
        ),
        ("model.vision.hf_config={hidden_size: 8}", "model.vision.hf_config: the native backbone is built from the recipe"),
        ("model.vision.patch_size=null", "model.vision.patch_size: the native backbone needs a patch size"),
        ("model.vision.patch_size=12", "model.vision.patch_size: 12: the conv stem needs a power of two"),
        ("model.vision.heads=3", "model.vision.width: 128 must split into 3 heads of a size divisible by 4"),
        ("model.vision.depth=0", "model.vision.depth: must be > 0, got 0"),
        ("model.vision.stem=patch", "model.vision.stem: 'patch' is not one of conv, linear"),
        ("model.lm.hf_config.model_type=null", "model.lm.hf_config: without model.lm.path it must hold a model_type"),
        ("model.lm.image_token=''", "model.lm.image_token: must not be empty"),
        ("model.lm.lora.rank=-1", "model.lm.lora.rank: must be >= 0, got -1"),
        ("model.lm.lora.dropout=1.0", "model.lm.lora.dropout: must be in [0, 1), got 1.0"),
        ("logger=tensorboard", "logger: 'tensorboard' is not one of wandb, csv, none"),
        ("name=a/b", "name: 'a/b' must be a non-empty name without '/'"),
        ("trainer.precision=bf16", "trainer.precision: 'bf16' is not one of"),
        ("trainer.strategy=fsdp1", "trainer.strategy: 'fsdp1' is not one of auto, ddp, fsdp, deepspeed"),
        ("trainer.devices=two", "trainer.devices: 'two' must be auto or a positive number"),
        ("trainer.deepspeed.stage=1", "trainer.deepspeed.stage: 1 is not a ZeRO stage this framework runs; choose 2 or 3"),
        ("trainer.deepspeed.offload_parameters=true", "trainer.deepspeed.offload_parameters: needs ZeRO stage 3"),
        ("trainer.deepspeed.offload_optimizer=true", "trainer.deepspeed.offload_optimizer: needs trainer.strategy: deepspeed"),
        ("trainer.deepspeed.config=ds.json", "trainer.deepspeed.config: needs trainer.strategy: deepspeed"),
        ("trainer.keep_checkpoints=0", "trainer.keep_checkpoints: must be > 0, got 0"),
        ("data.text.prompt=Describe", "data.text.prompt: must contain the image marker '<image>'"),
        ("data.video.budget=100", "data.video.budget: 100 is not one of 70, 140, 280, 560, 1120"),
        ("data.video.fps=nan", "data.video.fps: nan is not a finite number"),
        ("data.video.max_tokens=69", "data.video.max_tokens: 69 is less than one frame at the largest video budget, 70"),
        (
            "data.batching.batch_tokens=500",
            "data.batching.batch_tokens: 500 cannot hold one image at the largest budget plus data.text.max_length (1184)",
        ),
        ("data.batching.lookahead=0", "data.batching.lookahead: must be > 0, got 0"),
        ("data.num_workers=-1", "data.num_workers: must be >= 0, got -1"),
        ("data.sources=[{spec: a.tar}]", "data.train: give either data.train (one shard spec) or data.sources"),
        ("optim.lm.lr=-1", "optim.lm.lr: must be > 0"),
        ("optim.betas=[0.9]", "optim.betas: must be two numbers in [0, 1), got [0.9]"),
        ("optim.schedule=linear", "optim.schedule: 'linear' is not one of cosine, constant"),
        ("optim.min_lr_ratio=2", "optim.min_lr_ratio: must be in [0, 1], got 2.0"),
        ("model.vision.path=weights.pt", "model.vision.path: 'weights.pt': the native backbone loads a .safetensors file"),
    ],
)
def test_bad_recipes_give_one_clear_line(override, expected):
    assert expected in error_of([override])


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["budget.mode=matryoshka", "data.batching.batch_tokens=2400"],
            "data.batching.batch_tokens: 2400 cannot hold one image at the largest budget plus data.text.max_length (2490)",
        ),
        (["model.lm.lora.rank=4", "optim.lm.trainable=false"], "model.lm.lora.rank: LoRA adapters need optim.lm.trainable: true"),
        (
            ["model.projector.kind=gemma4", "model.projector.hidden_size=64"],
            "model.projector.hidden_size: the gemma4 projector has no hidden layer",
        ),
        (["model.lm.lora.rank=4", "model.lm.adapter=/some/adapter"], "model.lm.adapter: give either new LoRA adapters"),
        (
            ["data.train=''", "data.sources=[{spec: a.tar, weight: 2}, {spec: b.tar}]"],
            "data.sources: weights need data.resampled: true",
        ),
        (["data.train=''", "data.sources=[{spec: '', weight: 1}]"], "data.sources[0].spec: needs a shard spec"),
        (
            ["model.vision.backbone=dinov2", "model.vision.hf_config={hidden_size: 8}", "model.pooling.size=null"],
            "model.pooling.size: backbone 'dinov2' has no pool size of its own; set one",
        ),
        (
            ["model.lm.lora.rank=4", "model.lm.lora.target_modules=[]"],
            "model.lm.lora.target_modules: LoRA needs at least one target module",
        ),
        (["resume=auto", "overwrite=true"], "resume: cannot resume and overwrite at once"),
        (["model.lm.quantization=nf4"], "model.lm.quantization: nf4 quantizes a pretrained LM's weights under new LoRA adapters"),
        (["model.lm.quantization=int3"], "model.lm.quantization: 'int3' is not one of null, nf4"),
        (
            ["model.lm.path=models/x", "model.lm.hf_config=null", "model.lm.lora.rank=4", "model.lm.quantization=nf4",
             "trainer.strategy=fsdp"],
            "model.lm.quantization: a 4-bit LM trains with trainer.strategy auto or ddp, not fsdp",
        ),
        (
            [
                "model.vision.backbone=dinov2",
                "model.vision.path=null",
                "model.vision.hf_config={hidden_size: 8}",
                "model.vision.patch_size=null",
                "trainer.strategy=deepspeed",
                "trainer.deepspeed.stage=3",
            ],
            "data.batching.packing: DINOv2 runs once per image grid",
        ),
        (
            [
                "model.vision.backbone=dinov2",
                "model.vision.path=null",
                "model.vision.hf_config={hidden_size: 8}",
                "model.vision.patch_size=null",
                "trainer.strategy=fsdp",
            ],
            "data.batching.packing: DINOv2 runs once per image grid",
        ),
        (
            ["model.lm.path=models/x"],
            "model.lm.hf_config: is not used when model.lm.path loads a model (its config comes from the folder); clear it",
        ),
        (["model.lm.path=models/x", "model.lm.hf_config=null"], None),
        (
            ["model.vision.backbone=siglip2", "model.vision.path=null"],
            "model.vision.path: backbone 'siglip2' needs a local path or an hf_config",
        ),
        (["data.text.prompt_field=question", "data.text.prompt=none"], None),  # the prompt comes from the records
        (["model.vision.stem=linear", "model.vision.patch_size=12", "model.vision.width=96"], None),
    ],
)
def test_rules_across_sections(overrides, expected):
    if expected is None:
        load_recipe(TINY, overrides)
    else:
        assert expected in error_of(overrides)


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


def test_a_users_deepspeed_json_is_laid_over_the_generated_config(tmp_path):
    from vlmtrain.train.deepspeed_config import deepspeed_config

    file = tmp_path / "ds.json"
    file.write_text(json.dumps({
        "zero_optimization": {"stage": 3, "reduce_bucket_size": 2e7, "stage3_prefetch_bucket_size": "auto"},
        "gradient_clipping": "auto",
        "wall_clock_breakdown": True,
    }))
    recipe = load_recipe(TINY, ["trainer.strategy=deepspeed", "trainer.deepspeed.stage=3", f"trainer.deepspeed.config={file}",
                                "optim.grad_clip=0.5"])
    assert deepspeed_config(recipe, pin_memory=False) == {
        "zero_optimization": {
            "stage": 3, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 2e7,
            "allgather_bucket_size": 5e7,
        },
        "zero_allow_untested_optimizer": True,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_clipping": 0.5,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": True,
    }


@pytest.mark.parametrize(
    "content, expected",
    [
        ({"optimizer": {"type": "AdamW"}}, "'optimizer' is set by the optim section; remove it from the file (or write"),
        ({"bf16": {"enabled": True}}, "'bf16' is set by trainer.precision"),
        ({"gradient_accumulation_steps": 4}, "'gradient_accumulation_steps' is set by trainer.accumulate_grad_batches"),
        ({"zero_optimization": {"stage": 3}}, "stage is 3, trainer.deepspeed.stage is 2; set trainer.deepspeed.stage=3"),
        ([1, 2], "a DeepSpeed config is a JSON object"),
        ("{not json", "not valid JSON"),
        (None, "not found (a DeepSpeed JSON file)"),
    ],
)
def test_a_deepspeed_json_that_contradicts_the_recipe_is_one_line(tmp_path, content, expected):
    from vlmtrain.train.preflight import check_recipe

    file = tmp_path / "ds.json"
    if content is not None:
        file.write_text(content if isinstance(content, str) else json.dumps(content))
    recipe = load_recipe(TINY, ["trainer.strategy=deepspeed", f"trainer.deepspeed.config={file}"])
    with pytest.raises(RecipeError) as caught:
        check_recipe(recipe, "r.yaml")
    assert str(caught.value).startswith("r.yaml: trainer.deepspeed.config: ") and expected in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("mode, one_sample", [("sample", 1120 + 64), ("matryoshka", 70 + 140 + 280 + 560 + 1120 + 5 * 64)])
def test_batch_tokens_may_hold_exactly_one_sample_at_the_largest_budget_and_not_one_token_less(mode, one_sample):
    # the tiny recipe's texts are up to 64 tokens; one image at 1120 (every level at once in matryoshka mode)
    recipe = load_recipe(TINY, [f"budget.mode={mode}", f"data.batching.batch_tokens={one_sample}"])
    assert recipe.data.batching.batch_tokens == one_sample and recipe.data.text.max_length == 64
    with pytest.raises(RecipeError, match=rf"batch_tokens: {one_sample - 1} cannot hold one image .* \({one_sample}\)"):
        load_recipe(TINY, [f"budget.mode={mode}", f"data.batching.batch_tokens={one_sample - 1}"])
