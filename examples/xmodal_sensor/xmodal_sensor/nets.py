"""A 1-D encoder for the captioner's ``model.encoder`` slot: series ``[B, C, L]`` → tokens ``[B, L/patch, D]``."""

from __future__ import annotations

import torch
from torch import nn


class SeriesEncoder(nn.Module):
    """Non-overlapping patches (a strided conv), two conv layers of context, learned positions."""

    def __init__(self, d_model: int, channels: int = 1, length: int = 64, patch: int = 4):
        super().__init__()
        self.stem = nn.Conv1d(channels, d_model, patch, stride=patch)
        self.mix = nn.Sequential(
            nn.GELU(),
            nn.Conv1d(d_model, d_model, 3, padding=1),
            nn.GELU(),
            nn.Conv1d(d_model, d_model, 3, padding=1),
        )
        self.pos = nn.Parameter(torch.zeros(1, length // patch, d_model))
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        x = self.stem(series)  # [B, D, L/patch]
        x = x + self.mix(x)
        return x.transpose(1, 2) + self.pos[:, : x.shape[2]]  # [B, L/patch, D]
