"""Projectors: visual tokens from the vision width into the language model's embedding width."""

from __future__ import annotations

import torch
from torch import nn


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


def build_projector(kind: str, vision_width: int, hidden_size: int | None, lm_width: int) -> nn.Module:
    """The projector named ``kind`` (``mlp``: ``hidden_size`` defaults to ``lm_width``; ``gemma4``)."""
    if kind == "mlp":
        return Projector(vision_width, hidden_size or lm_width, lm_width)
    if kind == "gemma4":
        return Gemma4Projector(vision_width, lm_width)
    raise ValueError(f"unknown projector {kind!r}; choose mlp or gemma4")
