"""The language model: any Hugging Face causal LM, from a local folder or built from a config."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from vlmtrain.config import LMConfig, LoraConfig
from vlmtrain.model import attention  # noqa: F401 (registers the vlmtrain_varlen attention with transformers)
from vlmtrain.text.tokenizers import load_tokenizer


def lm_tokenizer(config: LMConfig) -> PreTrainedTokenizerBase:
    """The LM's tokenizer (its folder's, ``config.tokenizer``, or the byte tokenizer), with an image token."""
    return load_tokenizer(config.tokenizer or config.path, config.image_token)


def build_lm(config: LMConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel | PeftModel:
    """The causal LM, with room in its embedding table for the tokenizer's image token, and LoRA adapters,
    new or from an adapter folder, if asked.

    From ``config.path`` (local files only) or, with random weights, from ``config.hf_config``: a
    config-built LM takes its vocabulary size and special token ids from the tokenizer. Weights are
    created in the default dtype, which the trainer's precision sets (fp32, or bf16 for ``bf16-true``);
    under DeepSpeed ZeRO-3 transformers creates and loads them partitioned.
    """
    if config.path is not None:
        if not Path(config.path).is_dir():
            raise FileNotFoundError(f"language model folder {config.path!r} not found (only local paths are read)")
        lm = AutoModelForCausalLM.from_pretrained(
            config.path, local_files_only=True, dtype=torch.get_default_dtype(), attn_implementation=config.attn_implementation
        )
    else:
        values = dict(config.hf_config)
        model_type = values.pop("model_type")
        values.setdefault("vocab_size", len(tokenizer))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            values.setdefault(name, getattr(tokenizer, name))
        lm = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(model_type, **values),
            dtype=torch.get_default_dtype(),
            attn_implementation=config.attn_implementation,
        )
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer))
    if config.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora.rank:
        lm = add_lora(lm, config.lora)
    elif config.adapter is not None:
        if not Path(config.adapter).is_dir():
            raise FileNotFoundError(f"model.lm.adapter: {config.adapter!r} not found (a local PEFT adapter folder)")
        lm = PeftModel.from_pretrained(lm, config.adapter, is_trainable=True)  # set_trainable decides what trains
    return lm


def add_lora(lm: PreTrainedModel, lora: LoraConfig) -> PeftModel:
    """Wrap ``lm`` with LoRA adapters (PEFT): base weights frozen, adapters trainable."""
    settings = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(lm, settings)
    except ValueError as error:  # e.g. target modules the LM does not have
        raise ValueError(f"model.lm.lora: {error}") from None


def base_model(lm: PreTrainedModel | PeftModel) -> PreTrainedModel:
    """The transformers model inside a PEFT wrapper (or ``lm`` itself)."""
    return lm.get_base_model() if isinstance(lm, PeftModel) else lm
