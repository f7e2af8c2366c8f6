"""``vlmtrain export``: a run's checkpoint → one folder that loads without the training stack, in the layout
the model fits (a family's own checkpoint when the model has its shapes, vlmtrain's otherwise; see
:mod:`.format`). The folder is written under a temporary name and renamed when complete, so a failed export
leaves nothing behind. What did not train is rebuilt from the run's recipe, so the recipe's pretrained
folders must be where they were during training."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vlmtrain.config import Recipe, recipe_to_yaml
from vlmtrain.errors import UserError
from vlmtrain.export.card import model_card
from vlmtrain.export.format import (
    ADAPTER_DIR,
    DESCRIPTION_KEY,
    EXPORT_FORMAT,
    ExportConfig,
    Layout,
    TextFormat,
    canonical_json,
    weights_fingerprints,
    write_config,
)
from vlmtrain.export.run import trained_model
from vlmtrain.export.vlmtrain_layout import VLMTRAIN_LAYOUT
from vlmtrain.families import ASSEMBLED, family_of
from vlmtrain.model.description import ModelDescription
from vlmtrain.model.lm import save_adapter_folder
from vlmtrain.modeling.vlm import VisionLanguageModel
from vlmtrain.train.layout import last_evaluation


class Exportable(Protocol):
    """A model and what an export writes beside it (a run's :class:`~.run.TrainedModel`, a loaded model)."""

    model: VisionLanguageModel
    tokenizer: PreTrainedTokenizerBase
    description: ModelDescription
    text_format: TextFormat


def merged_lm(trained: Exportable, keep_adapter: bool) -> PreTrainedModel:
    """The LM an export stores: LoRA merged in (or, with ``keep_adapter``, unloaded: the base), in a copy, so
    the trained model stays as it was."""
    lm = trained.model.lm
    if not isinstance(lm, PeftModel):
        return lm
    return copy.deepcopy(lm).unload() if keep_adapter else copy.deepcopy(lm).merge_and_unload()


def merged(part: nn.Module) -> nn.Module:
    """A vision part with its LoRA adapters merged, in a copy (the trained model stays as it was)."""
    return copy.deepcopy(part).merge_and_unload() if isinstance(part, PeftModel) else part


def choose_layout(trained: Exportable, lm: PreTrainedModel, keep_adapter: bool) -> tuple[Layout, str]:
    """(layout, a line saying what the folder is): the family's own checkpoint when the model has its shapes
    (:meth:`~vlmtrain.families.assembled.Family.native_mismatch`), vlmtrain's otherwise; the line says why a
    model of a family with a native form is not exported in it."""
    if keep_adapter:
        if any(config.use_dora for config in trained.model.lm.peft_config.values()):
            raise UserError("--keep-adapter: a DoRA adapter cannot be merged at loading without PEFT; export it merged")
        return VLMTRAIN_LAYOUT, (
            "the base LM in lm/, its LoRA adapter in lm-adapter/; one transformers model (AutoModelForImageTextToText, "
            "trust_remote_code), the adapter merged in at loading"
        )
    family = family_of(trained.description)
    mismatch = family.native_mismatch(trained.description, lm, trained.tokenizer)
    if mismatch is None:
        return family.native_layout, family.native_layout.summary
    line = "one transformers model (AutoModelForImageTextToText, trust_remote_code)"
    if family is not ASSEMBLED:
        line += f"; not native {family.title}: {mismatch}"
    return VLMTRAIN_LAYOUT, line


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
    """Write the export folder of a run or checkpoint; returns ``out``. ``report`` is given one line saying what
    the folder is."""
    refuse_existing(out)  # before the model is built
    if evaluation is not None and evaluation.is_dir():
        evaluation = evaluation / "eval.json"
    if evaluation is not None and not evaluation.is_file():
        raise UserError(f"--eval {evaluation}: no such eval.json (vlmtrain eval writes one)")
    trained = trained_model(source)
    evaluation = evaluation or last_evaluation(trained.run_dir)
    line = write_export(trained, trained.recipe, out, keep_adapter, evaluation, trained.run_dir)
    if report is not None:
        report(line)
    return out


def write_export(
    trained: Exportable,
    recipe: Recipe,
    out: Path,
    keep_adapter: bool = False,
    evaluation: Path | None = None,
    run_dir: Path | None = None,
) -> str:
    """Write ``trained`` (made by ``recipe``, in ``run_dir``) as an export folder ``out``; the files go to a
    temporary folder renamed when complete. Returns a line saying what the folder is."""
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


def _write_files(trained: Exportable, recipe: Recipe, out: Path, keep_adapter: bool, evaluation: dict | None) -> str:
    keep_adapter = keep_adapter and isinstance(trained.model.lm, PeftModel)
    lm = merged_lm(trained, keep_adapter)
    layout, line = choose_layout(trained, lm, keep_adapter)
    model = trained.model
    description = replace(  # the projector's width resolved (None: the LM's)
        trained.description, projector=replace(trained.description.projector, hidden_size=model.projector.hidden_size)
    )
    adapter = ADAPTER_DIR if keep_adapter else None
    out.mkdir(parents=True)
    config = ExportConfig(EXPORT_FORMAT, layout.name, description, trained.text_format, adapter, video=recipe.data.video)
    write_config(out, config)
    if adapter is not None:
        save_adapter_folder(model.lm, out / adapter)
    backbone, projector = (merged(part) for part in (model.backbone, model.projector))
    composed = VisionLanguageModel(
        backbone, model.pooling, projector, lm, model.image_token_id, model.geometry, video_token_id=model.video_token_id
    )
    metadata = {DESCRIPTION_KEY: canonical_json(description)}
    layout.write(out, composed, description, trained.tokenizer, metadata, recipe.data.video, adapter)
    write_config(out, replace(config, weights=weights_fingerprints(out)))
    (out / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    (out / "README.md").write_text(model_card(recipe, description, layout, trained.text_format.prompt, evaluation))
    return line
