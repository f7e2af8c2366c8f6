"""vlmtrain: training mixed-budget vision encoders for vision-language models."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from vlmtrain.inference import ExportedModel


def load(path, device="cpu", dtype=None) -> ExportedModel:
    """Load a model written by ``vlmtrain export`` for inference (imports neither Lightning nor DeepSpeed)."""
    import torch

    from vlmtrain.inference import load as load_export

    return load_export(path, device=device, dtype=dtype or torch.float32)
