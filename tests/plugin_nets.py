"""A user's own encoder for the captioner's ``model.encoder`` slot (``_target_``), outside the package."""

from __future__ import annotations

import math

import torch
from torch import nn


class MeanColourEncoder(nn.Module):
    """Images ``[B, C, H, W]`` → ``tokens`` mean colours of a square grid, projected ``[B, tokens, D]``."""

    def __init__(self, d_model: int, tokens: int = 4, in_channels: int = 3):
        super().__init__()
        self.side = math.isqrt(tokens)
        self.proj = nn.Linear(in_channels, d_model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(images, self.side)  # [B, C, s, s]
        return self.proj(pooled.flatten(2).transpose(1, 2))  # [B, s*s, D]
