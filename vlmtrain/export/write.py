"""``vlmtrain export``: a run's checkpoint → one folder that loads without the training stack.

    OUT/lm/                 the language model as a Hugging Face folder (config, safetensors, tokenizer),
                            LoRA merged in; with ``keep_adapter`` the base LM plus OUT/lm-adapter/ (PEFT)
    OUT/vision/config.json  the model description (backbone kind and settings, pooling, projector, LM source,
                            budgets) and the text format (prompt template, record fields)
    OUT/vision/model.safetensors  encoder, pooling and projector weights (the description again, in its metadata)
    OUT/recipe.yaml         the run's resolved recipe
    OUT/README.md           a model card, with the per-budget table of an evaluation when there is one
    OUT/config.json, *.py, model.safetensors.index.json, processor_config.json, tokenizer files
                            the folder as one transformers model with its processor (remote code that needs
                            torch and transformers only; the index points at vision/ and lm/, no weight is
                            stored twice; with ``keep_adapter`` the adapter is merged in at loading; see
                            :mod:`vlmtrain.export.transformers_model`)

A model with Gemma 4's shapes is written instead as a native Gemma 4 checkpoint at OUT's root (config,
weights under Gemma 4's names, tokenizer, processor: :mod:`vlmtrain.families.gemma4`), with the description
in OUT/vision/config.json; vlmtrain reads its weights from the root (``layout: gemma4``), none is stored twice.

Reads ``trained.safetensors`` from the checkpoint (no pickle, no DeepSpeed) and rebuilds what did not
train from the run's recipe, so the recipe's pretrained folders must be where they were during training.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from vlmtrain.config import Recipe, load_recipe, recipe_to_yaml
from vlmtrain.errors import UserError
from vlmtrain.export.card import model_card
from vlmtrain.export.transformers_model import write_transformers_model
from vlmtrain.families import ASSEMBLED, build_model, family_of
from vlmtrain.families.gemma4 import write_native_gemma4
from vlmtrain.inference import (
    ADAPTER_DIR,
    CONFIG_FILE,
    DESCRIPTION_KEY,
    EXPORT_FORMAT,
    GEMMA4_LAYOUT,
    LM_DIR,
    VISION_DIR,
    VISION_PARTS,
    VLMTRAIN_LAYOUT,
    WEIGHTS_FILE,
    ExportedModel,
)
from vlmtrain.model.config import LoraConfig
from vlmtrain.model.description import ModelDescription, canonical_json
from vlmtrain.model.lm import save_adapter_folder
from vlmtrain.modeling.vlm import VisionLanguageModel
from vlmtrain.plan import RunPlan, plan_run
from vlmtrain.train.layout import CHECKPOINTS, TRAINED, last_evaluation, latest_checkpoint
from vlmtrain.train.optim import set_trainable


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


def trained_model(source: Path) -> tuple[ExportedModel, RunPlan, Path]:
    """The model of a run with the weights of its checkpoint: (model, the run's plan, run directory).

    Built as training built it (same plan, same seeds, same pretrained folders), then the trained weights
    loaded."""
    run_dir, checkpoint = locate(source)
    plan = plan_run(load_recipe(run_dir / "recipe.yaml"))
    model = build_model(plan.model, plan.tokenizer, plan.recipe.seed)
    set_trainable(model, plan.recipe.optim)
    trained = {name.removeprefix("model."): tensor for name, tensor in load_file(checkpoint / TRAINED).items()}
    expected = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    if set(trained) != expected:
        raise UserError(f"{checkpoint}: trained weights do not match the recipe's trainable parameters "
                        f"({len(set(trained) ^ expected)} differ, e.g. {sorted(set(trained) ^ expected)[:2]})")
    model.load_state_dict(trained, strict=False)
    return ExportedModel(model, plan.tokenizer, plan.model, plan.recipe.data.text), plan, run_dir


def merged_lm(trained: ExportedModel, keep_adapter: bool) -> PreTrainedModel:
    """The LM an export stores: LoRA merged in (or, with ``keep_adapter``, unloaded: the base), in a copy, so
    the trained model stays as it was."""
    lm = trained.model.lm
    if not isinstance(lm, PeftModel):
        return lm
    return copy.deepcopy(lm).unload() if keep_adapter else copy.deepcopy(lm).merge_and_unload()


def export_layout(trained: ExportedModel, lm: PreTrainedModel, keep_adapter: bool) -> tuple[str, str]:
    """(layout, a line saying what the folder is): the family's own checkpoint when the model has its shapes
    (:meth:`~vlmtrain.families.assembled.Family.native_mismatch`), ``vlmtrain`` otherwise; the line says why a
    model of a family with a native form is not exported in it."""
    if keep_adapter and isinstance(trained.model.lm, PeftModel):
        return VLMTRAIN_LAYOUT, (
            "the base LM in lm/, its LoRA adapter in lm-adapter/; one transformers model (AutoModelForImageTextToText, "
            "trust_remote_code), the adapter merged in at loading"
        )
    family = family_of(trained.description)
    mismatch = family.native_mismatch(trained.description, lm, trained.tokenizer)
    if mismatch is None:
        return family.name, family.native_form
    line = "one transformers model (AutoModelForImageTextToText, trust_remote_code)"
    if family is not ASSEMBLED:
        line += f"; not native {family.title}: {mismatch}"
    return VLMTRAIN_LAYOUT, line


def exported_description(trained: ExportedModel, keep_adapter: bool, layout: str) -> ModelDescription:
    """The description an export folder holds: the run's, with the projector's width resolved, the weights
    in the folder (nothing to start from, LoRA merged or in ``lm-adapter/``; a native Gemma 4 folder is its
    own LM folder)."""
    description = trained.description
    vision = replace(description.vision, weights=None, gradient_checkpointing=False)
    lm = replace(description.lm, path="." if layout == GEMMA4_LAYOUT else LM_DIR, hf_config={}, tokenizer=None,
                 gradient_checkpointing=False, lora=LoraConfig(),
                 adapter=ADAPTER_DIR if keep_adapter and isinstance(trained.model.lm, PeftModel) else None)
    projector = replace(description.projector, hidden_size=trained.model.projector.hidden_size)
    return replace(description, vision=vision, lm=lm, projector=projector)


def refuse_existing(out: Path) -> None:
    if out.exists():
        raise UserError(f"{out} already exists; choose another folder")


def export(
    source: Path,
    out: Path,
    keep_adapter: bool = False,
    evaluation: Path | None = None,
    report: Callable[[str], None] | None = None,
) -> Path:
    """Write the export folder of a run or checkpoint; returns ``out``. The folder is written under a
    temporary name and renamed when complete, so a failed export leaves nothing behind. ``report`` is given
    one line saying what the folder is."""
    refuse_existing(out)  # before the model is built
    if evaluation is not None and evaluation.is_dir():
        evaluation = evaluation / "eval.json"
    if evaluation is not None and not evaluation.is_file():
        raise UserError(f"--eval {evaluation}: no such eval.json (vlmtrain eval writes one)")
    trained, plan, run_dir = trained_model(source)
    line = write_export(trained, plan.recipe, out, keep_adapter, evaluation or last_evaluation(run_dir), run_dir)
    if report is not None:
        report(line)
    return out


def write_export(
    trained: ExportedModel,
    recipe: Recipe,
    out: Path,
    keep_adapter: bool = False,
    evaluation: Path | None = None,
    run_dir: Path | None = None,
) -> str:
    """Write ``trained`` (made by ``recipe``, in ``run_dir``) as an export folder ``out`` (see the module
    docstring); the files go to a temporary folder renamed when complete, so a failure leaves nothing behind.
    Returns a line saying what the folder is."""
    refuse_existing(out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        line = _write_files(trained, recipe, partial, keep_adapter, evaluation_of(evaluation, run_dir) if evaluation else None)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return line


def evaluation_of(evaluation: Path, run_dir: Path | None) -> dict[str, Any]:
    """The results of ``evaluation`` (an eval.json) for one model: the run's own entry when it evaluated
    several (the first otherwise), with the data it ran on."""
    results = json.loads(evaluation.read_text())
    models = results["models"]
    own = [m for m in models if run_dir is not None and Path(m.get("path", "")) == run_dir.resolve()]
    return {**results, "models": own or models[:1]}


def _write_files(trained: ExportedModel, recipe: Recipe, out: Path, keep_adapter: bool, evaluation: dict | None) -> str:
    lm = merged_lm(trained, keep_adapter)
    layout, line = export_layout(trained, lm, keep_adapter)
    description = exported_description(trained, keep_adapter, layout)
    (out / VISION_DIR).mkdir(parents=True)
    config = {"format": EXPORT_FORMAT, "layout": layout, "model": description.to_dict(), "text": asdict(trained.text_format)}
    (out / VISION_DIR / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    metadata = {DESCRIPTION_KEY: canonical_json(description)}
    model = trained.model
    if layout == GEMMA4_LAYOUT:
        composed = VisionLanguageModel(model.backbone, model.pooling, model.projector, lm, model.image_token_id, model.geometry)
        write_native_gemma4(out, composed, description.to_dict(), trained.tokenizer, metadata)
    else:
        vision = {
            f"{part}.{name}": tensor.contiguous()
            for part in VISION_PARTS
            for name, tensor in getattr(model, part).state_dict().items()
        }
        save_file(vision, str(out / VISION_DIR / WEIGHTS_FILE), metadata=metadata)
        if description.lm.adapter is not None:
            save_adapter_folder(model.lm, out / ADAPTER_DIR)
        lm.save_pretrained(out / LM_DIR, safe_serialization=True)
        trained.tokenizer.save_pretrained(out / LM_DIR)
        write_transformers_model(
            out, description.to_dict(), trained.geometry, lm, trained.tokenizer, (VISION_DIR, LM_DIR), description.lm.adapter
        )
    (out / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    (out / "README.md").write_text(model_card(recipe, description, layout, trained.text_format.prompt, evaluation))
    return line
