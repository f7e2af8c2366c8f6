"""Saving the LoRA adapters a run trained, gathered whole even when ZeRO-3 partitions them across ranks."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from peft import PeftModel
from torch.distributed.tensor import DTensor

from vlmtrain.model.lm import is_adapter_parameter, save_adapter_folder


def gathered(parameters: list[torch.nn.Parameter], strategy: L.pytorch.strategies.Strategy) -> AbstractContextManager:
    """Inside, ``parameters`` hold their full values on every rank (ZeRO-3 keeps only a shard of each)."""
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(parameters, modifier_rank=None)
    return nullcontext()


def whole_values(named: list[tuple[str, torch.nn.Parameter]], strategy: L.pytorch.strategies.Strategy) -> dict[str, torch.Tensor]:
    """The whole value of each named parameter, on CPU, gathered one at a time where ZeRO-3 or FSDP2 keep a
    shard on each rank. Collective: every rank calls it with the same names."""
    values = {}
    for name, parameter in named:
        with gathered([parameter], strategy):
            whole = parameter.full_tensor() if isinstance(parameter, DTensor) else parameter
            values[name] = whole.detach().to("cpu", copy=True).contiguous()
    return values


def save_adapter(lm: torch.nn.Module, trainer: L.Trainer, directory: Path) -> Path | None:
    """Write the LM's trained adapters as a PEFT folder (``adapter_config.json``, safetensors); None without LoRA."""
    if not isinstance(lm, PeftModel):
        return None
    adapters = whole_values([(name, p) for name, p in lm.named_parameters() if is_adapter_parameter(name)], trainer.strategy)
    if trainer.is_global_zero:
        save_adapter_folder(lm, directory, adapters)
    trainer.strategy.barrier("adapter-saved")
    return directory
