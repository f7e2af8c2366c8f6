"""Projector: visual tokens from the vision width into the language model's embedding width."""

from __future__ import annotations

import torch
from torch import nn


class Projector(nn.Module):
    """LayerNorm, then a two-layer GELU MLP."""

    def __init__(self, vision_width: int, hidden_size: int, lm_width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(vision_width)
        self.mlp = nn.Sequential(nn.Linear(vision_width, hidden_size), nn.GELU(), nn.Linear(hidden_size, lm_width))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(tokens.to(self.norm.weight.dtype)))
