"""Saving the LoRA adapters a run trained, gathered whole even when ZeRO-3 partitions them across ranks."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from peft import PeftModel

from vlmtrain.model.lm import is_adapter_parameter, save_adapter_folder


def gathered(parameters: list[torch.nn.Parameter], strategy: L.pytorch.strategies.Strategy) -> AbstractContextManager:
    """Inside, ``parameters`` hold their full values on every rank (ZeRO-3 keeps only a shard of each)."""
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(parameters, modifier_rank=None)
    return nullcontext()


def save_adapter(lm: torch.nn.Module, trainer: L.Trainer, directory: Path) -> Path | None:
    """Write the LM's trained adapters as a PEFT folder (``adapter_config.json``, safetensors); None without LoRA."""
    if not isinstance(lm, PeftModel):
        return None
    adapters = [parameter for name, parameter in lm.named_parameters() if is_adapter_parameter(name)]
    with gathered(adapters, trainer.strategy):
        if trainer.is_global_zero:
            save_adapter_folder(lm, directory)
    trainer.strategy.barrier("adapter-saved")
    return directory
