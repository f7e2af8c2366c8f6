"""The export folder as one transformers model: ``AutoModelForImageTextToText.from_pretrained(OUT,
trust_remote_code=True)`` and ``AutoProcessor.from_pretrained(OUT, trust_remote_code=True)``, in a Python
with torch and transformers only.

At the folder's root: the modules of :mod:`vlmtrain.modeling` (the modelling, configuration and processing
code and the vlmtrain modules they run, copied as they are: the same code that trained the model), ``config.json``
(the model description and the LM's config), ``processor_config.json`` with the tokenizer, and
``model.safetensors.index.json``, which maps every weight to the file that already holds it (``vision/``
and ``lm/``), so that no weight is stored twice.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import vlmtrain.modeling
from vlmtrain.data.config import VideoConfig
from vlmtrain.modeling.geometry import Geometry
from vlmtrain.modeling.prompt import FrameLayout
from vlmtrain.weights import open_weights

SHIPPED = Path(vlmtrain.modeling.__file__).parent  # every module in it is copied, as it is
AUTO_MAP = {
    "AutoConfig": "configuration_vlmtrain.VlmtrainConfig",
    "AutoModelForImageTextToText": "modeling_vlmtrain.VlmtrainForConditionalGeneration",
}
INDEX_FILE = "model.safetensors.index.json"


def weight_map(out: Path, folder: str) -> dict[str, str]:
    """Every weight in ``out/folder`` (one safetensors file or an index of shards) → its file, from ``out``."""
    index = out / folder / INDEX_FILE
    if index.is_file():
        return {name: f"{folder}/{file}" for name, file in json.loads(index.read_text())["weight_map"].items()}
    with open_weights(out / folder / "model.safetensors") as handle:
        return dict.fromkeys(handle.keys(), f"{folder}/model.safetensors")


def video_settings(layout: FrameLayout, video: VideoConfig) -> dict[str, Any]:
    """The processor's video settings: how the model's family writes and samples a video (``layout``), and how
    training sampled them (``video``: the rate, the most frames and tokens, the budget and the levels drawn)."""
    return {
        "frame_layout": asdict(layout), "video_fps": video.fps, "video_max_frames": video.max_frames,
        "video_max_tokens": video.max_tokens, "video_budget": video.budget, "video_levels": video.levels,
    }


def write_transformers_model(
    out: Path,
    description: dict[str, Any],
    geometry: Geometry,
    lm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    folders: tuple[str, str],
    adapter: str | None = None,
    video_token_id: int | None = None,
    video: dict[str, Any] | None = None,
) -> None:
    """Make ``out`` (whose ``folders``, vision then LM, hold the weights; ``adapter``, a LoRA adapter folder
    merged in at loading; ``video_token_id``, the token of a video's frames in the family's layout; ``video``, how
    its processor samples and writes a video: :func:`video_settings`) load as one transformers model."""
    for file in sorted(SHIPPED.glob("*.py")):
        if file.name != "__init__.py":
            shutil.copyfile(file, out / file.name)
    text_config = lm.config.to_dict()
    config = {
        "model_type": "vlmtrain",
        "architectures": ["VlmtrainForConditionalGeneration"],
        "auto_map": AUTO_MAP,
        "description": description,
        "text_config": text_config,
        "image_token_id": tokenizer.convert_tokens_to_ids(description["lm"]["image_token"]),
        "video_token_id": video_token_id,
        "adapter": adapter,
        "tie_word_embeddings": text_config.get("tie_word_embeddings", False),
        "dtype": text_config.get("dtype", "float32"),
        "transformers_version": transformers.__version__,
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    weights = {name: file for folder in folders for name, file in weight_map(out, folder).items()}
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weights}, indent=1))
    processor = {
        "patch_size": geometry.patch_size,
        "pool": geometry.pool,
        "levels": list(geometry.levels),
        "rule": geometry.rule,
        "min_pixels": geometry.min_pixels,
        "frames": geometry.frames,
        "default_budget": description["default_budget"],
        "image_token": description["lm"]["image_token"],
        **(video or {}),
        "processor_class": "VlmtrainProcessor",
        "auto_map": {"AutoProcessor": "processing_vlmtrain.VlmtrainProcessor"},
    }
    (out / "processor_config.json").write_text(json.dumps(processor, indent=1))
    tokenizer.save_pretrained(out)
    generation = out / folders[1] / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, out / "generation_config.json")
