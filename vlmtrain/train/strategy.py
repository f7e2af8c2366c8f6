"""Choosing how training is distributed: one place turns the recipe into a Lightning strategy.

``auto`` (one device), ``ddp``, ``fsdp`` (FSDP2, :mod:`.fsdp`), or ``deepspeed`` with ZeRO stage 2 or 3; the DeepSpeed config is
generated from the recipe, a user's own DeepSpeed JSON laid over it if the recipe names one
(:mod:`.deepspeed_config`). On CPU (tests, CI) DeepSpeed runs on gloo through
a strategy that skips Lightning's CUDA-only check.
"""

from __future__ import annotations

import os

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy

from vlmtrain.config import Recipe
from vlmtrain.train.deepspeed_config import deepspeed_config
from vlmtrain.train.fsdp import FSDP2Strategy


def on_gpu(recipe: Recipe) -> bool:
    """Whether the run uses CUDA devices."""
    accelerator = recipe.trainer.accelerator
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def device_count(recipe: Recipe) -> int:
    """Devices of this node: the recipe's number, or those the launcher (torchrun, SLURM) or the machine gives."""
    if recipe.trainer.devices != "auto":
        return int(recipe.trainer.devices)
    for variable in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        if os.environ.get(variable, "").isdigit():
            return int(os.environ[variable])
    return torch.cuda.device_count() if on_gpu(recipe) else 1


def node_count(recipe: Recipe) -> int:
    """Nodes: the recipe's number, or SLURM's, or torchrun's world size divided by the local one."""
    if recipe.trainer.num_nodes != "auto":
        return int(recipe.trainer.num_nodes)
    if os.environ.get("SLURM_NNODES", "").isdigit():
        return int(os.environ["SLURM_NNODES"])
    world, local = os.environ.get("WORLD_SIZE", ""), os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(world) // int(local) if world.isdigit() and local.isdigit() and int(local) else 1


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeed on CPU processes (gloo): Lightning refuses anything but CUDA, DeepSpeed itself does not."""

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)


def build_strategy(recipe: Recipe) -> Strategy | str:
    """The Lightning strategy for ``recipe.trainer.strategy``."""
    name = recipe.trainer.strategy
    if name == "auto":
        return "auto"
    gpu = on_gpu(recipe)
    backend = "nccl" if gpu else "gloo"
    if name == "ddp":
        return DDPStrategy(process_group_backend=backend, find_unused_parameters=False)
    if name == "fsdp":
        return FSDP2Strategy(device_count(recipe) * node_count(recipe), backend)
    config = deepspeed_config(recipe, pin_memory=gpu)
    if gpu:
        strategy = DeepSpeedStrategy(config=config, exclude_frozen_parameters=True)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        devices = [torch.device("cpu", index) for index in range(device_count(recipe))]
        strategy = CPUDeepSpeedStrategy(
            config=config, parallel_devices=devices, process_group_backend="gloo", exclude_frozen_parameters=True
        )
    if recipe.trainer.deepspeed.stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # transformers then creates and loads pretrained weights partitioned (it keeps only a weak
        # reference: the strategy holds the object for the run)
        strategy.hf_deepspeed_config = HfDeepSpeedConfig(dict(config))
    return strategy
