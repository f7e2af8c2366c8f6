"""FSDP2 (``torch.distributed.fsdp.fully_shard``) through Lightning's ``ModelParallelStrategy``: every repeated
block of the model (LM layers, vision blocks, mergers) and then the whole model sharded across the ranks, each
weight all-gathered for its forward and backward (ZeRO-3-like); checkpoints are sharded (each rank writes its
part) and hold only what trains, as under DeepSpeed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint import load
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The members of every ``ModuleList`` that hold parameters (transformer layers, vision blocks, DeepStack
    mergers), innermost first: the units FSDP2 gathers one at a time."""
    blocks = [
        member
        for module in model.modules()
        if isinstance(module, torch.nn.ModuleList)
        for member in module
        if any(True for _ in member.parameters())
    ]
    return blocks[::-1]


def shard(model: torch.nn.Module, mesh: DeviceMesh, entry_points: tuple[str, ...] = ("sample_losses",)) -> None:
    """Shard ``model`` across ``mesh`` in place: each repeated block, then the rest (embeddings, heads, the
    projector and what ties them) as one unit, gathered around ``forward`` and each of ``entry_points`` (the
    methods training calls instead of ``forward``)."""
    for block in repeated_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for method in entry_points:
        register_fsdp_forward_method(model, method)


def frozen_keys(module: torch.nn.Module) -> set[str]:
    """State-dict names of ``module``'s frozen parameters (tied ones under every name): what checkpoints leave out."""
    return {name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's FSDP2 strategy with every rank in one data-parallel group, resuming from checkpoints that
    hold only the trained weights: it asks them for those alone (Lightning's own loader asks for every weight,
    frozen ones too, and fails)."""

    def __init__(self, world_size: int, process_group_backend: str) -> None:
        super().__init__(data_parallel_size=world_size, tensor_parallel_size=1, process_group_backend=process_group_backend)

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """Load the trained weights and optimizer states into the sharded model; return the rest (loops, callbacks)."""
        path = Path(self.broadcast(str(checkpoint_path)))
        frozen = frozen_keys(self.model)
        weights = {key: value for key, value in get_model_state_dict(self.model).items() if key not in frozen}
        load({"state_dict": weights}, checkpoint_id=path)
        set_model_state_dict(self.model, weights, options=StateDictOptions(strict=False))
        for index, optimizer in enumerate(self.optimizers):
            state = {f"optimizer_{index}": get_optimizer_state_dict(self.model, optimizer)}
            load(state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state[f"optimizer_{index}"])
        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)  # what Lightning saved beside the shards
