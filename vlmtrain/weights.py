"""Reading safetensors files: a file that is cut short, not safetensors (a pickle renamed, say) or missing is one
line naming it, never a raw library error; nothing here can run code from a file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from vlmtrain.errors import UserError


@contextmanager
def open_weights(path: Path | str) -> Iterator[Any]:
    """``safe_open(path)`` (PyTorch tensors); a damaged or missing file raises :class:`UserError` naming it."""
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path}: not a readable safetensors file ({error})") from None
    with handle:
        yield handle


def read_weights(path: Path | str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (see :func:`open_weights`)."""
    with open_weights(path) as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}
