"""``vlmtrain export``: a run's checkpoint → one folder that loads without the training stack.

    OUT/lm/                 the language model as a Hugging Face folder (config, safetensors, tokenizer),
                            LoRA merged in; with ``keep_adapter`` the base LM plus OUT/lm-adapter/ (PEFT)
    OUT/vision/config.json  encoder, pooling and projector settings, the geometry, the image token, prompt
    OUT/vision/model.safetensors
    OUT/recipe.yaml         the run's resolved recipe
    OUT/README.md           a model card, with the per-budget table of an evaluation when there is one

Reads ``trained.safetensors`` from the checkpoint (no pickle, no DeepSpeed) and rebuilds what did not
train from the run's recipe, so the recipe's pretrained folders must be where they were during training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from peft import PeftModel
from safetensors.torch import load_file, save_file

from vlmtrain.config import Recipe, load_recipe
from vlmtrain.errors import UserError
from vlmtrain.inference import VISION_FORMAT, VISION_PARTS
from vlmtrain.model.backbone import NativeViT
from vlmtrain.model.build import build_model, set_trainable
from vlmtrain.model.lm import lm_tokenizer
from vlmtrain.model.vlm import VisionLanguageModel
from vlmtrain.train.layout import CHECKPOINTS, TRAINED, latest_checkpoint


def locate(source: Path) -> tuple[Path, Path]:
    """(run directory, checkpoint directory) of a run directory (its latest checkpoint) or a checkpoint."""
    if (source / "recipe.yaml").is_file():
        checkpoint = latest_checkpoint(source / CHECKPOINTS)
        if checkpoint is None:
            raise UserError(f"{source}: the run has no complete checkpoint yet")
        return source, checkpoint
    if (source / TRAINED).is_file() and (source.parent.parent / "recipe.yaml").is_file():
        return source.parent.parent, source
    raise UserError(f"{source}: neither a run directory (with recipe.yaml) nor one of its checkpoints")


def trained_model(source: Path) -> tuple[VisionLanguageModel, Any, Recipe, Path]:
    """The model of a run with the weights of its checkpoint: (model, tokenizer, recipe, run directory).

    Built as training built it (same seeds, same pretrained folders), then the trained weights loaded."""
    run_dir, checkpoint = locate(source)
    recipe = load_recipe(run_dir / "recipe.yaml")
    tokenizer = lm_tokenizer(recipe.model.lm)
    model = build_model(recipe.model, tuple(recipe.budget.levels), tokenizer, recipe.seed)
    set_trainable(model, recipe.optim)
    trained = {name.removeprefix("model."): tensor for name, tensor in load_file(checkpoint / TRAINED).items()}
    expected = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    if set(trained) != expected:
        raise UserError(f"{checkpoint}: trained weights do not match the recipe's trainable parameters "
                        f"({len(set(trained) ^ expected)} differ, e.g. {sorted(set(trained) ^ expected)[:2]})")
    model.load_state_dict(trained, strict=False)
    return model.eval(), tokenizer, recipe, run_dir


def vision_config(model: VisionLanguageModel, recipe: Recipe) -> dict[str, Any]:
    """Everything :func:`vlmtrain.inference.load` needs to rebuild the vision side and use it."""
    backbone = model.backbone
    if isinstance(backbone, NativeViT):
        vision = recipe.model.vision
        settings = {"patch_size": backbone.patch_size, "width": backbone.width, "depth": vision.depth, "heads": vision.heads,
                    "mlp_ratio": vision.mlp_ratio, "rope_theta": vision.rope_theta, "stem": vision.stem}
        kind = "native"
    else:
        settings, kind = backbone.model.config.to_dict(), recipe.model.vision.backbone
    pooling = recipe.model.pooling
    return {
        "format": VISION_FORMAT,
        "backbone": {"kind": kind, "settings": settings},
        "pooling": {"kind": pooling.kind, "size": model.geometry.pool, "heads": pooling.heads},
        "projector": {"vision_width": backbone.width, "hidden_size": model.projector.mlp[0].out_features,
                      "lm_width": model.projector.mlp[2].out_features},
        "geometry": {"patch_size": model.geometry.patch_size, "pool": model.geometry.pool,
                     "levels": list(model.geometry.levels), "default_budget": recipe.budget.default},
        "image_token": recipe.model.lm.image_token,
        "image_token_id": model.image_token_id,
        "prompt": recipe.data.prompt,
        "prompt_field": recipe.data.prompt_field,
        "target_field": recipe.data.target_field,
    }


def export(source: Path, out: Path, keep_adapter: bool = False, evaluation: Path | None = None) -> Path:
    """Write the export folder of a run or checkpoint; returns ``out``."""
    model, tokenizer, recipe, run_dir = trained_model(source)
    if out.exists():
        raise UserError(f"{out} already exists; choose another folder")
    (out / "vision").mkdir(parents=True)
    vision = {f"{part}.{name}": tensor.contiguous() for part in VISION_PARTS
              for name, tensor in getattr(model, part).state_dict().items()}
    save_file(vision, str(out / "vision" / "model.safetensors"))
    config = vision_config(model, recipe)
    (out / "vision" / "config.json").write_text(json.dumps(config, indent=1))
    lm = model.lm
    if isinstance(lm, PeftModel):
        if keep_adapter:
            lm.save_pretrained(out / "lm-adapter")
            lm = lm.unload()
        else:
            lm = lm.merge_and_unload()
    lm.save_pretrained(out / "lm", safe_serialization=True)
    tokenizer.save_pretrained(out / "lm")
    shutil.copy(run_dir / "recipe.yaml", out / "recipe.yaml")
    evaluation = evaluation or (run_dir / "eval" / "eval.json")
    (out / "README.md").write_text(model_card(recipe, config, evaluation if evaluation.is_file() else None))
    return out


def model_card(recipe: Recipe, vision: dict[str, Any], evaluation: Path | None) -> str:
    """A README for the export folder: what the model is, how to load it, and its per-budget results."""
    geometry = vision["geometry"]
    lines = [
        f"# {recipe.name}",
        "",
        "A vision-language model with a mixed-budget vision encoder, trained with vlmtrain. One image is",
        f"represented by at most {', '.join(map(str, geometry['levels']))} visual tokens, chosen per image",
        (f"(patch {geometry['patch_size']}, pool {geometry['pool']}: one token per "
         f"{geometry['patch_size'] * geometry['pool']}x{geometry['patch_size'] * geometry['pool']} pixels; "
         f"default {geometry['default_budget']})."),
        "",
        f"- vision encoder: {vision['backbone']['kind']}, pooling: {vision['pooling']['kind']}",
        "- language model: `lm/` (loads with `transformers.AutoModelForCausalLM.from_pretrained`)",
        f"- image token: `{vision['image_token']}`; prompt template: `{vision['prompt']!r}`",
        "",
        "```python",
        "import vlmtrain",
        "from PIL import Image",
        "model = vlmtrain.load(\"PATH/TO/THIS/FOLDER\")",
        "print(model.generate([Image.open(\"page.png\")], budget=1120))",
        "```",
    ]
    if evaluation is not None:
        results = json.loads(evaluation.read_text())
        lines += ["", "## Results by budget", "", f"Evaluated on `{results.get('data', '?')}`.", "", results_table(results["models"][0])]
    lines += ["", "## Training recipe", "", "See `recipe.yaml`."]
    return "\n".join(lines) + "\n"


def results_table(model_results: dict[str, Any]) -> str:
    """A Markdown table of one model's evaluation, a row per budget."""
    rows = ["| budget | loss | token accuracy | exact match | word recall | visual tokens / image | images/s | latency / image |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in model_results["budgets"]:
        exact = "-" if row.get("exact_match") is None else f"{row['exact_match']:.1%}"
        recall = "-" if row.get("word_recall") is None else f"{row['word_recall']:.1%}"
        rows.append(f"| {row['budget']} | {row['loss']:.3f} | {row['token_accuracy']:.1%} | {exact} | {recall} | "
                    f"{row['visual_tokens_per_image']:.0f} | {row['images_per_s']:.1f} | {row['latency_ms']:.1f} ms |")
    return "\n".join(rows)

