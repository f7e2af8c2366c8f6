"""A vlmtrain model as one transformers model (shipped in every export; imports torch and transformers only).

The vision side is vlmtrain's own code, shipped beside this file; the language model is any transformers
causal LM built from ``config.text_config``. Its submodules are registered under the names of the export's
weight files (``backbone.*``, ``pooling.*``, ``projector.*`` from vision/model.safetensors; the LM's own
names from lm/), which model.safetensors.index.json maps, so that the folder holds each weight once."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .backbones import BACKBONES
from .configuration_vlmtrain import VlmtrainConfig
from .inputs import ImageBatch
from .pooling import build_pooling
from .projector import build_projector
from .qwen_lm import QwenVLTextForCausalLM  # noqa: F401 (importing it registers Qwen-VL's text models as causal LMs)
from .vlm import VisionLanguageModel

IMAGE_INPUTS = ("pixel_values", "pixel_positions", "patch_grids", "token_grids", "image_sample_index", "image_token_times")


class VlmtrainForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """Images (from the export's processor, each at its own budget) and text in, next-token logits out."""

    config_class = VlmtrainConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: VlmtrainConfig) -> None:
        super().__init__(config)
        description = config.description
        vision, pooling = description["vision"], description["pooling"]
        kind = BACKBONES[vision["kind"]]
        backbone = kind.build(vision["settings"])
        geometry = kind.geometry(vision["settings"], pooling["size"], tuple(description["levels"]))
        lm = AutoModelForCausalLM.from_config(config.text_config)
        width = lm.get_input_embeddings().embedding_dim
        projection = description["projector"]
        projector = build_projector(projection["kind"], backbone.width, projection["hidden_size"], width)
        pool = build_pooling(pooling["kind"], geometry.pool, backbone.width, pooling["heads"])
        # the composition, not a submodule: its parts are, under the weight files' names
        token_ids = {"image_token_id": config.image_token_id, "video_token_id": config.video_token_id}
        vlm = VisionLanguageModel(backbone, pool, projector, lm, geometry=geometry, **token_ids)
        object.__setattr__(self, "vlm", vlm)
        for name in ("backbone", "pooling", "projector"):
            self.add_module(name, getattr(self.vlm, name))
        for name, child in lm.named_children():
            self.add_module(name, child)
        self._tied_weights_keys = getattr(lm, "_tied_weights_keys", None)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any) -> Any:
        """transformers' loading; then the LoRA adapter that an export made with ``--keep-adapter`` keeps beside
        the base language model (``config.adapter``, a folder of the export) is merged in."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if model.config.adapter:
            merge_lora(model, Path(pretrained_model_name_or_path) / model.config.adapter)
        return loaded

    def _init_weights(self, module: torch.nn.Module) -> None:
        """transformers builds the model on the meta device and loads the weights; what no file holds is set
        here: vlmtrain modules recompute their non-persistent buffers, the LM's modules are the LM's."""
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
        else:
            super()._init_weights(module)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.vlm.lm.get_input_embeddings()

    def get_output_embeddings(self) -> torch.nn.Module | None:
        return self.vlm.lm.get_output_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_positions: torch.Tensor | None = None,
        patch_grids: torch.Tensor | None = None,
        token_grids: torch.Tensor | None = None,
        image_sample_index: torch.Tensor | None = None,
        image_token_times: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """The LM's output, each image placeholder in ``input_ids`` replaced by its visual token (a video's units
        at their M-RoPE times in their block, ``image_token_times``)."""
        if inputs_embeds is None:
            if pixel_values is not None:
                grids = (patch_grids, token_grids)
                images = ImageBatch(pixel_values, pixel_positions, *grids, image_sample_index, image_token_times)
                inputs_embeds, visual_inputs = self.vlm.embed(input_ids, images)
                kwargs.update(visual_inputs)
                positions = kwargs.get("position_ids")  # generation's 1-D positions of the prompt, if any
                if positions is None or positions.ndim == 2:  # an LM with multimodal RoPE takes 3-D ones
                    positions = self.vlm.rope_positions(input_ids, images, positions)
                    kwargs["position_ids"] = positions if positions is not None else kwargs.get("position_ids")
            else:
                inputs_embeds = self.get_input_embeddings()(input_ids)
        return self.vlm.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The images go in with the prompt only; later steps read them from the cache."""
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        cache = inputs.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:
            for name in IMAGE_INPUTS:
                inputs.pop(name, None)
        return inputs


def merge_lora(model: torch.nn.Module, folder: Path) -> None:
    """Add a PEFT LoRA adapter's update, ``B @ A`` times ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), to
    each weight it adapts; the adapter's module names are the language model's, which this model keeps at its
    root. Only plain LoRA (what vlmtrain trains) is read; anything else is refused in one line."""
    settings = json.loads((folder / "adapter_config.json").read_text())
    plain = settings.get("peft_type") == "LORA" and settings.get("bias", "none") == "none" and not any(
        settings.get(name) for name in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern")
    )
    if not plain:
        raise ValueError(f"{folder}: not a plain LoRA adapter (DoRA, biases, per-layer ranks); merge it with PEFT")
    rank = settings["r"]
    scale = settings["lora_alpha"] / (math.sqrt(rank) if settings.get("use_rslora") else rank)
    tensors = load_file(folder / "adapter_model.safetensors")
    with torch.no_grad():
        for name, down in tensors.items():
            if name.endswith(".lora_A.weight"):
                up = tensors[name.removesuffix(".lora_A.weight") + ".lora_B.weight"]
                weight = model.get_submodule(name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")).weight
                weight += (up.float() @ down.float() * scale).to(weight.dtype)
