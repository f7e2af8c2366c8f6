"""The language model: any Hugging Face causal LM, from a local folder or built from a config."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from vlmtrain.config import LMConfig
from vlmtrain.text import load_tokenizer


def build_lm(config: LMConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The causal LM and its tokenizer, with room in the embedding table for the image token.

    From ``config.path`` (local files only) or, with random weights, from ``config.hf_config``; a
    config-built LM takes its vocabulary size and special token ids from the tokenizer.
    """
    tokenizer = load_tokenizer(config.tokenizer or config.path, config.image_token)
    if config.path is not None:
        if not Path(config.path).is_dir():
            raise FileNotFoundError(f"language model folder {config.path!r} not found (only local paths are read)")
        lm = AutoModelForCausalLM.from_pretrained(
            config.path, local_files_only=True, dtype=torch.float32, attn_implementation=config.attn_implementation
        )
    else:
        values = dict(config.hf_config)
        model_type = values.pop("model_type")
        values.setdefault("vocab_size", len(tokenizer))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            values.setdefault(name, getattr(tokenizer, name))
        lm = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(model_type, **values), dtype=torch.float32, attn_implementation=config.attn_implementation
        )
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer))
    if config.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return lm, tokenizer
