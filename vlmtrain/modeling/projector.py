"""Projectors: visual tokens from the vision width into the language model's embedding width."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError


class Projector(nn.Module):
    """LayerNorm, then a two-layer GELU MLP."""

    def __init__(self, vision_width: int, hidden_size: int, lm_width: int) -> None:
        super().__init__()
        self.hidden_size: int | None = hidden_size
        self.norm = nn.LayerNorm(vision_width)
        self.mlp = nn.Sequential(nn.Linear(vision_width, hidden_size), nn.GELU(), nn.Linear(hidden_size, lm_width))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(tokens.to(self.norm.weight.dtype)))


class Gemma4Projector(nn.Module):
    """Gemma 4's multimodal embedder: RMSNorm without scale (in float32), then a linear map without bias, as
    ``Gemma4MultimodalEmbedder`` (its weight is ``embedding_projection.weight``)."""

    eps = 1e-6  # Gemma 4's vision rms_norm_eps

    def __init__(self, vision_width: int, lm_width: int) -> None:
        super().__init__()
        self.hidden_size: int | None = None
        self.embedding_projection = nn.Linear(vision_width, lm_width, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        dtype = self.embedding_projection.weight.dtype
        normed = tokens.float() * torch.pow(tokens.float().pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        return self.embedding_projection(normed.to(dtype))


@dataclass(frozen=True)
class ProjectorKind:
    """How to build one kind of projector: ``build(vision_width, hidden_size, lm_width)``; whether it has a hidden
    layer (whose size a recipe may set)."""

    build: Callable[[int, int | None, int], nn.Module]
    hidden_layer: bool


class IdentityProjector(nn.Identity):
    """For an encoder that projects itself to the LM's width (Qwen2.5-VL's patch merger): no weights."""

    def __init__(self, vision_width: int, lm_width: int) -> None:
        super().__init__()
        if vision_width != lm_width:
            raise UserError(f"model.projector.kind: identity, but the encoder gives width {vision_width}, the LM {lm_width}")
        self.hidden_size: int | None = None


PROJECTORS: dict[str, ProjectorKind] = {
    "mlp": ProjectorKind(lambda vision, hidden, lm: Projector(vision, hidden or lm, lm), hidden_layer=True),
    "gemma4": ProjectorKind(lambda vision, hidden, lm: Gemma4Projector(vision, lm), hidden_layer=False),
    "identity": ProjectorKind(lambda vision, hidden, lm: IdentityProjector(vision, lm), hidden_layer=False),
}


def build_projector(kind: str, vision_width: int, hidden_size: int | None, lm_width: int) -> nn.Module:
    """The projector named ``kind`` (one of :data:`PROJECTORS`; ``mlp``: ``hidden_size`` defaults to ``lm_width``)."""
    if kind not in PROJECTORS:
        raise ValueError(f"unknown projector {kind!r}; choose {' or '.join(PROJECTORS)}")
    return PROJECTORS[kind].build(vision_width, hidden_size, lm_width)
