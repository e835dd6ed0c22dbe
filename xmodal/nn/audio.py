"""Audio encoders: a log-mel spectrogram → a sequence of feature tokens over time."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from xmodal.nn.image import conv_stages


class LogMelEncoder(nn.Module):
    """Conv stages over ``[B, 1, M, T]``, then the mel axis is folded into the channels so every
    remaining time step is one token ``[B, T', D]``.

    The first stage cuts ``patch``×``patch`` patches (as the image encoder does; ``patch=2`` is a
    3×3 stride-2 conv), each later one halves mel and time. Keeping time as the token axis lets a
    decoder's cross-attention find *when* a sound happens (on shapes: which slot, i.e. which
    shape). Patchifying by 4 first is ~4× cheaper on CPU than a full-resolution stride-2 stem.
    """

    def __init__(self, channels: Sequence[int], d_model: int, n_mels: int, frames: int, patch: int = 2):
        super().__init__()
        # patch 2: the first stage halves with a 3×3 conv like the others (as before audio_patch).
        self.stem, width = conv_stages(1, channels, patch, patchify_first=patch != 2)
        self.downsample = patch * 2 ** (len(channels) - 1)
        mel_out = -(-n_mels // self.downsample)
        self.num_tokens = -(-frames // self.downsample)
        self.proj = nn.Linear(width * mel_out, d_model)
        self.pos = nn.Parameter(torch.zeros(1, self.num_tokens, d_model))
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        features = self.stem(mels)  # [B, C, M', T'] from log-mels in model units (about [-1, 1])
        batch, channels, mel, time = features.shape
        tokens = features.permute(0, 3, 1, 2).reshape(batch, time, channels * mel)  # [B, T', C*M']
        return self.proj(tokens) + self.pos[:, :time]  # [B, T', D]

    def token_mask(self, frame_mask: torch.Tensor) -> torch.Tensor:
        """Frame mask ``[B, T]`` → token mask ``[B, T']``: a token is real if any of its frames is."""
        batch, frames = frame_mask.shape
        pad = (-frames) % self.downsample
        padded = torch.nn.functional.pad(frame_mask, (0, pad))
        return padded.view(batch, -1, self.downsample).any(-1)  # [B, T']
