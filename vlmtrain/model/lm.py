"""The language model: any Hugging Face causal LM, from a local folder or built from a config."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.utils import logging as transformers_logging

from vlmtrain.errors import UserError
from vlmtrain.model.config import LMConfig, LoraConfig
from vlmtrain.modeling import (
    attention,  # noqa: F401 (registers the vlmtrain_varlen attention with transformers)
    qwen_lm,  # noqa: F401 (registers Qwen2.5-VL's and Qwen3-VL's text models as causal LMs)
)
from vlmtrain.modeling.tokenizers import load_tokenizer


def lm_tokenizer(config: LMConfig) -> PreTrainedTokenizerBase:
    """The LM's tokenizer (its folder's, ``config.tokenizer``, or the byte tokenizer), with an image token."""
    return load_tokenizer(config.tokenizer or config.path, config.image_token)


def folder_config(path: str) -> PretrainedConfig:
    """The config of the LM folder ``path``, without a GGUF ``quantization_config``: one names the GGUF file
    a folder was converted from (transformers keeps it, and then refuses to save the model) while the
    folder's own weights are plain tensors, read as they are."""
    lm_config = AutoConfig.from_pretrained(path, local_files_only=True)
    quantization = getattr(lm_config, "quantization_config", None)
    if isinstance(quantization, dict) and quantization.get("quant_method") == "gguf":
        del lm_config.quantization_config
    return lm_config


KeyMappings = Mapping[str, Mapping[str, str]]  # a whole checkpoint's model_type → where its LM's weights are


def load_folder_lm(
    path: str, attn_implementation: str, key_mappings: KeyMappings, quantization: str | None = None
) -> PreTrainedModel:
    """The causal LM in folder ``path``: a causal LM's folder, or the text model of a whole vision-language
    checkpoint whose model_type ``key_mappings`` knows (a transformers key_mapping from the checkpoint's names
    to the causal LM's; e.g. a Gemma 4 release, whose vision tower the recipe reads too); its linear layers
    4-bit with ``quantization`` (:func:`quantization_config`)."""
    lm_config = folder_config(path)
    options = {"local_files_only": True, "dtype": torch.get_default_dtype(), "attn_implementation": attn_implementation}
    if quantization is not None:
        options["quantization_config"] = quantization_config(quantization)
    key_mapping = key_mappings.get(lm_config.model_type)
    if key_mapping is None:
        return AutoModelForCausalLM.from_pretrained(path, config=lm_config, **options)
    text_config = lm_config.get_text_config()
    if getattr(lm_config, "tie_word_embeddings", None) is not None:  # Qwen2.5-VL keeps it beside, not in, its text config
        text_config.tie_word_embeddings = lm_config.tie_word_embeddings
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its report lists the checkpoint's other parts as unexpected
    try:
        lm, info = AutoModelForCausalLM.from_pretrained(
            path, config=text_config, key_mapping=key_mapping, output_loading_info=True, **options
        )
    finally:
        transformers_logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(f"{path}: {len(missing)} weights of its language model missing, e.g. {missing[:3]}")
    return lm


def quantization_config(kind: str) -> BitsAndBytesConfig:
    """bitsandbytes' 4-bit ``kind`` (nf4) with nested quantization, computing in the default dtype, as QLoRA does."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(f"model.lm.quantization: {kind} needs bitsandbytes: pip install 'vlmtrain[qlora]'") from None
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.get_default_dtype(),
    )


def build_lm(
    config: LMConfig, tokenizer: PreTrainedTokenizerBase, key_mappings: KeyMappings | None = None
) -> PreTrainedModel | PeftModel:
    """The causal LM, with room in its embedding table for the tokenizer's image token, and LoRA adapters,
    new or from an adapter folder, if asked.

    From ``config.path`` (local files only; the LM of a whole checkpoint whose model_type ``key_mappings`` knows,
    :func:`load_folder_lm`) or, with random weights, from ``config.hf_config``: a
    config-built LM takes its vocabulary size and special token ids from the tokenizer. Weights are
    created in the default dtype, which the trainer's precision sets (fp32, or bf16 for ``bf16-true``);
    under DeepSpeed ZeRO-3 transformers creates and loads them partitioned.
    """
    if config.path is not None:
        if not Path(config.path).is_dir():
            raise FileNotFoundError(f"language model folder {config.path!r} not found (only local paths are read)")
        lm = load_folder_lm(config.path, config.attn_implementation, key_mappings or {}, config.quantization)
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
    if getattr(lm.config, "hidden_size_per_layer_input", None):
        raise UserError(
            f"model.lm: this {lm.config.model_type} LM has per-layer input embeddings (hidden_size_per_layer_input="
            f"{lm.config.hidden_size_per_layer_input}, e.g. Gemma 4 E2B/E4B), looked up from token ids that image "
            "positions do not have; vlmtrain does not train such LMs yet"
        )
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:  # the image token, when the vocabulary lacked it
        add_token_rows(lm, len(tokenizer))
    if config.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora.rank:
        lm = add_lora(lm, config.lora)
    elif config.adapter is not None:
        if not Path(config.adapter).is_dir():
            raise FileNotFoundError(f"model.lm.adapter: {config.adapter!r} not found (a local PEFT adapter folder)")
        lm = PeftModel.from_pretrained(lm, config.adapter, is_trainable=True)  # set_trainable decides what trains
    return lm


def add_token_rows(lm: PreTrainedModel, vocabulary: int) -> None:
    """Grow the LM's embedding rows (input, and output when untied) to ``vocabulary``; each new row is the
    mean of the existing ones, a function of the base weights alone. So the rows are the same however often
    the LM is rebuilt, and a LoRA adapter (which leaves them frozen) reloads onto the base to the same
    outputs without carrying them. (transformers' own mean resizing adds random noise and fails under ZeRO-3.)"""
    rows = lm.get_input_embeddings().num_embeddings
    lm.resize_token_embeddings(vocabulary, mean_resizing=False)
    modules = [module for module in (lm.get_input_embeddings(), lm.get_output_embeddings()) if module is not None]
    weights = list({id(module.weight): module.weight for module in modules}.values())  # once when tied
    with gathered_for_writing(weights):
        with torch.no_grad():
            for weight in weights:
                weight[rows:] = weight[:rows].mean(dim=0)


def gathered_for_writing(weights: list[torch.nn.Parameter]) -> AbstractContextManager:
    """Inside, ``weights`` are whole and writable, also under DeepSpeed ZeRO-3 (which keeps a shard of each)."""
    if is_deepspeed_zero3_enabled():
        import deepspeed

        return deepspeed.zero.GatheredParameters(weights, modifier_rank=0)
    return nullcontext()


def add_lora(
    module: torch.nn.Module, lora: LoraConfig, section: str = "model.lm.lora", task_type: str | None = "CAUSAL_LM"
) -> PeftModel:
    """Wrap ``module`` (the LM, or the vision encoder or projector with ``task_type`` None) with LoRA adapters (PEFT): base
    weights frozen, adapters trainable; a mistake (target modules it does not have) is one line naming ``section``."""
    settings = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        use_dora=lora.dora,
        use_rslora=lora.rslora,
        task_type=task_type,
    )
    try:
        return get_peft_model(module, settings)
    except ValueError as error:  # e.g. target modules the model does not have
        raise UserError(f"{section}: {error}") from None


def is_adapter_parameter(name: str) -> bool:
    """Whether the parameter ``name`` (of any part) belongs to a LoRA adapter."""
    return "lora_" in name


def save_adapter_folder(lm: PeftModel, directory: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``lm``'s adapter as a PEFT folder, from ``weights`` (its adapter parameters by name, whole) where
    the LM's own are sharded. Only what trained is saved: PEFT would otherwise save whole embedding matrices
    of an LM whose vocabulary grew by the image token (its rows follow from the base weights, :func:`add_token_rows`)."""
    lm.save_pretrained(directory, save_embedding_layers=False, state_dict=weights)
