"""A family's own checkpoint format as an export layout (:class:`vlmtrain.export.format.Layout`), its writer beside
its reader: the model's weights under the family's names at the folder's root, the family's config, tokenizer,
processor files and generation config, so that transformers (and whatever serves the family) loads the folder
with no remote code. A family says only what differs: its names, its config, its processor files, and how a
request names the budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from vlmtrain.data.config import VideoConfig
from vlmtrain.model.description import ModelDescription
from vlmtrain.model.pretrained import prefixed_tensors
from vlmtrain.modeling.vlm import VisionLanguageModel


class NativeCheckpoint:
    """An export as the family's own checkpoint (see the module docstring)."""

    name: str  # the layout's name in vision/config.json
    title: str  # the family, in the model card
    summary: str  # what ``vlmtrain export`` says it wrote
    card_summary: str  # the model card's line on what the folder is
    budget_name: str  # how the family's processor names the budget, in the model card
    names: tuple[tuple[str, str], ...] = ()  # vlmtrain's weight-name prefixes → the family's, LM ones starting "lm."
    lm_folder = "."  # the checkpoint is its own language model's folder

    def config(self, description: ModelDescription, lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
        """The checkpoint's config.json."""
        raise NotImplementedError

    def processor_files(
        self, description: ModelDescription, model: VisionLanguageModel, video: VideoConfig
    ) -> dict[str, dict[str, Any]]:
        """The processor's JSON files by name, its default budget the model's, its video processor sampling frames
        as training did (``video``: its rate, its most frames, their budget)."""
        raise NotImplementedError

    def budget_kwargs(self, budget: int) -> str:
        """The processor call's ``images_kwargs`` for ``budget``, as written in the model card."""
        raise NotImplementedError

    def card_usage(self, prompt: str, budget: int) -> list[str]:
        """The model card's lines on serving the folder with transformers alone."""
        return [
            "",
            f"With transformers alone (or anything that serves {self.title}; the budget is {self.budget_name}):",
            "",
            "```python",
            "from PIL import Image",
            "from transformers import AutoModelForImageTextToText, AutoProcessor",
            'model = AutoModelForImageTextToText.from_pretrained("PATH/TO/THIS/FOLDER")',
            'processor = AutoProcessor.from_pretrained("PATH/TO/THIS/FOLDER")',
            f'inputs = processor(text={prompt!r}, images=[Image.open("page.png")], return_tensors="pt",',
            f"                   images_kwargs={self.budget_kwargs(budget)})",
            "print(processor.decode(model.generate(**inputs, max_new_tokens=32)[0, inputs['input_ids'].shape[1]:]))",
            "```",
        ]

    def write(
        self,
        out: Path,
        model: VisionLanguageModel,
        description: ModelDescription,
        tokenizer: PreTrainedTokenizerBase,
        metadata: dict[str, str],
        video: VideoConfig,
        adapter: str | None = None,
    ) -> None:
        """Write ``model`` (its LM merged: a native checkpoint keeps no ``adapter``) into ``out``: config, weights
        under the family's names (sharded, each file's metadata with ``metadata``), tokenizer, processor files
        (videos sampled as ``video`` says)."""
        config = self.config(description, model.lm, tokenizer)
        config.save_pretrained(out)
        state = {self.native_name(name): tensor for name, tensor in model.state_dict().items()}
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_torch_state_dict(state, out, metadata={"format": "pt", **metadata})
        tokenizer.save_pretrained(out)
        for name, values in self.processor_files(description, model, video).items():
            (out / name).write_text(json.dumps(values, indent=1))
        if model.lm.generation_config is not None:
            model.lm.generation_config.save_pretrained(out)

    def weights_file(self, folder: Path) -> Path:
        return min(folder.glob("*.safetensors"), default=folder / "model.safetensors")  # every shard keeps the description

    def vision_weights(self, folder: Path) -> dict[str, torch.Tensor]:
        """The weights of the parts before the LM under vlmtrain's names (the inverse of :meth:`native_name`)."""
        weights: dict[str, torch.Tensor] = {}
        for ours, theirs in self.names:
            if not ours.startswith("lm."):
                weights |= {ours + name: tensor for name, tensor in prefixed_tensors(folder, (theirs,)).items()}
        return weights

    def native_name(self, name: str) -> str:
        """The family's name for the vlmtrain weight ``name``."""
        for ours, theirs in self.names:
            if name.startswith(ours):
                return theirs + name[len(ours) :]
        raise ValueError(f"{name}: no place in a {self.title} checkpoint")
