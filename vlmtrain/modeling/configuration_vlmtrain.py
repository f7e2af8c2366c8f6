"""The configuration of a vlmtrain model as a transformers model (shipped in every export; no vlmtrain).

``description`` is the model description vlmtrain trained from (vision/config.json's ``model``: backbone
kind and settings, pooling, projector, levels, image token); ``text_config`` the language model's config;
``adapter`` the export's LoRA adapter folder, merged in at loading (an export made with ``--keep-adapter``)."""

from __future__ import annotations

from typing import Any

import transformers
from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

TRANSFORMERS_NEEDED = (5, 23)  # the shipped code uses transformers 5's attention and masking interfaces


def require_transformers(version: str) -> None:
    """Refuse, in one line, a transformers older than :data:`TRANSFORMERS_NEEDED` (the shipped modules would
    fail on an import deep inside instead)."""
    found = tuple(int(part) for part in version.split(".")[:2])
    if found < TRANSFORMERS_NEEDED:
        needed = ".".join(map(str, TRANSFORMERS_NEEDED))
        install = f"pip install 'transformers>={needed},<6'"
        raise ImportError(f"this model's code needs transformers >= {needed}, found {version}: {install}")


require_transformers(transformers.__version__)


class VlmtrainConfig(PretrainedConfig):
    """A mixed-budget vision encoder, pooling and projector in front of a causal LM."""

    model_type = "vlmtrain"
    sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        description: dict[str, Any] | None = None,
        text_config: dict[str, Any] | PretrainedConfig | None = None,
        image_token_id: int | None = None,
        adapter: str | None = None,
        video_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(text_config, dict):
            text_config = CONFIG_MAPPING[text_config["model_type"]](**text_config)
        self.description = description or {}
        self.text_config = text_config
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.adapter = adapter
        super().__init__(**kwargs)
