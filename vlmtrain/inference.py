"""Using an exported model (see :mod:`vlmtrain.export`) without Lightning or DeepSpeed: weights come from
safetensors and settings from JSON only, never from a pickle."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from vlmtrain.data.batch import ImageBatch
from vlmtrain.data.images import patch_positions, patchify, to_rgb
from vlmtrain.geometry import Geometry
from vlmtrain.model.backbone import NativeViT, VisionBackbone
from vlmtrain.model.hf_vision import load_tower
from vlmtrain.model.pooling import build_pooling
from vlmtrain.model.projector import Projector
from vlmtrain.model.vlm import VisionLanguageModel
from vlmtrain.text import TextEncoder

VISION_FORMAT = "vlmtrain-vision/1"
VISION_PARTS = ("backbone", "pooling", "projector")


class ExportedModel:
    """A loaded export: prepare images at any budget (one per image), get logits, generate text."""

    def __init__(self, model: VisionLanguageModel, tokenizer: PreTrainedTokenizerBase, config: dict[str, Any]) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.text = TextEncoder(tokenizer, config["image_token"], max_text_length=10**9)

    @property
    def geometry(self) -> Geometry:
        return self.model.geometry

    def budgets_for(self, images: Sequence[Image.Image], budget: int | Sequence[int] | None) -> list[int]:
        """One budget per image: the default, one for all, or one each."""
        if budget is None:
            budget = self.config["geometry"]["default_budget"]
        budgets = [budget] * len(images) if isinstance(budget, int) else list(budget)
        if len(budgets) != len(images):
            raise ValueError(f"{len(budgets)} budgets for {len(images)} images")
        return budgets

    def inputs(self, images: Sequence[Image.Image], prompt: str | None = None, budget: int | Sequence[int] | None = None) -> tuple[torch.Tensor, ImageBatch]:
        """Token ids of the prompt with each image's placeholders, and the images cut at their budgets."""
        device = next(self.model.parameters()).device
        items = []
        for image, image_budget in zip(images, self.budgets_for(images, budget)):
            image = to_rgb(image)
            geometry = self.geometry.image(image.height, image.width, image_budget)
            items.append((patchify(image, geometry, self.geometry.patch_size), patch_positions(geometry), geometry.token_grid, 0))
        batch = ImageBatch.stack(items, patch_dim=3 * self.geometry.patch_size**2)
        prompt = self.config["prompt"] if prompt is None else prompt
        ids = self.text.encode_prompt(prompt, [grid[0] * grid[1] for *_, grid, _ in items])
        images_on_device = ImageBatch(*(getattr(batch, f).to(device) for f in ("pixels", "positions", "token_grids", "sample_index")))
        return torch.tensor([ids], device=device), images_on_device

    @torch.no_grad()
    def logits(self, images: Sequence[Image.Image], prompt: str | None = None, budget: int | Sequence[int] | None = None) -> torch.Tensor:
        """Next-token logits ``(1, L, vocab)`` for the prompt with the images."""
        input_ids, images_batch = self.inputs(images, prompt, budget)
        embeds = self.model.embed(input_ids, images_batch)
        return self.model.lm(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids), use_cache=False).logits

    @torch.no_grad()
    def generate(
        self, images: Sequence[Image.Image], prompt: str | None = None, budget: int | Sequence[int] | None = None, max_new_tokens: int = 64, **kwargs: Any
    ) -> str:
        """Greedy (or ``kwargs``-configured) continuation of the prompt, as text."""
        input_ids, images_batch = self.inputs(images, prompt, budget)
        embeds = self.model.embed(input_ids, images_batch)
        settings = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": self.tokenizer.pad_token_id,
                    "eos_token_id": self.tokenizer.eos_token_id, **kwargs}
        output = self.model.lm.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids), **settings)
        return self.tokenizer.decode(output[0], skip_special_tokens=True)


def build_backbone(settings: dict[str, Any]) -> VisionBackbone:
    """The vision backbone an export describes, with random weights (loaded next)."""
    if settings["kind"] == "native":
        return NativeViT(**settings["settings"])
    return load_tower(settings["kind"], None, settings["settings"])


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> ExportedModel:
    """Load an export folder for inference (no Lightning, no DeepSpeed, no pickle)."""
    path = Path(path)
    config = json.loads((path / "vision" / "config.json").read_text())
    if config.get("format") != VISION_FORMAT:
        raise ValueError(f"{path}: not a vlmtrain export (vision/config.json format {config.get('format')!r})")
    geometry_settings = config["geometry"]
    geometry = Geometry(geometry_settings["patch_size"], geometry_settings["pool"], tuple(geometry_settings["levels"]))
    backbone = build_backbone(config["backbone"])
    pooling = build_pooling(config["pooling"]["kind"], config["pooling"]["size"], backbone.width, config["pooling"]["heads"])
    projector = Projector(**config["projector"])
    weights = load_file(path / "vision" / "model.safetensors")
    for name, part in zip(VISION_PARTS, (backbone, pooling, projector)):
        part.load_state_dict({key[len(name) + 1 :]: value for key, value in weights.items() if key.startswith(name + ".")}, strict=True)
    lm = AutoModelForCausalLM.from_pretrained(path / "lm", local_files_only=True, dtype=dtype)
    if (path / "lm-adapter").is_dir():
        lm = PeftModel.from_pretrained(lm, path / "lm-adapter")
    tokenizer = AutoTokenizer.from_pretrained(path / "lm", local_files_only=True)
    model = VisionLanguageModel(backbone, pooling, projector, lm, config["image_token_id"], geometry)
    return ExportedModel(model.to(device=device, dtype=dtype), tokenizer, config)
