"""Image encoders that turn pixels into a sequence of feature tokens for cross-attention."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def conv_stages(
    in_channels: int, channels: Sequence[int], patch: int, patchify_first: bool
) -> tuple[nn.Sequential, int]:
    """Downsampling conv stages (down conv, GroupNorm, GELU, 3×3 conv, GroupNorm, GELU) and their
    output width. Stage 0 cuts ``patch``×``patch`` patches when ``patchify_first``, else it halves
    like every later stage (3×3, stride 2)."""
    layers: list[nn.Module] = []
    width = in_channels
    for stage, out in enumerate(channels):
        down = (
            nn.Conv2d(width, out, kernel_size=patch, stride=patch)
            if stage == 0 and patchify_first
            else nn.Conv2d(width, out, kernel_size=3, stride=2, padding=1)
        )
        layers += [
            down,
            nn.GroupNorm(min(8, out), out),
            nn.GELU(),
            nn.Conv2d(out, out, kernel_size=3, padding=1),
            nn.GroupNorm(min(8, out), out),
            nn.GELU(),
        ]
        width = out
    return nn.Sequential(*layers), width


class ConvImageEncoder(nn.Module):
    """Conv stages: the first cuts ``patch``×``patch`` patches, each later one halves the resolution;
    the final grid becomes the token sequence.

    A 64×64 image with ``patch=4`` and two stages gives an 8×8 grid = 64 tokens, each carrying a
    learned position embedding so the decoder can name where things are. Patchifying first rather
    than convolving at full resolution is ~2× faster on CPU for the same accuracy on shapes.
    """

    def __init__(
        self, channels: Sequence[int], d_model: int, image_size: int, patch: int = 4, in_channels: int = 3
    ):
        super().__init__()
        self.stem, width = conv_stages(in_channels, channels, patch, patchify_first=True)
        self.proj = nn.Linear(width, d_model)
        grid = image_size // (patch * 2 ** (len(channels) - 1))
        self.num_tokens = grid * grid
        self.pos = nn.Parameter(torch.zeros(1, self.num_tokens, d_model))
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.stem(images)  # [B, C, h, w]
        tokens = features.flatten(2).transpose(1, 2)  # [B, h*w, C]
        return self.proj(tokens) + self.pos  # [B, N, D]


def saturated_value(images: torch.Tensor, knee: float = 0.5) -> torch.Tensor:
    """HSV value ``max(R, G, B)`` in [0, 1], scaled by ``1 / knee`` and clipped at 1.

    The value alone still tells colours apart by brightness (the shapes palette's green peaks at
    190, blue at 235), enough for a conv stem to tie shape to colour again. Clipping makes every
    colour brighter than the knee exactly 1 while a dark background keeps its (scaled) texture.
    ``images`` are ``[B, C, H, W]`` in [-1, 1]; returns ``[B, 1, H, W]`` in [0, 1].
    """
    value = images.amax(dim=1, keepdim=True).add(1.0).mul(0.5)  # [B, 1, H, W] in [0, 1]
    return value.mul(1.0 / knee).clamp(max=1.0)


class FactorizedImageEncoder(nn.Module):
    """Shape from saturated brightness, colour from a coarse bag of pixels, summed per token.

    A conv stem on RGB learns shape detectors tied to the colours it saw them in: trained without
    blue triangles, it calls a blue triangle a diamond (the shapes compositional split). Here the
    conv stages see only :func:`saturated_value`, in which every colour brighter than the knee is
    the same 1, and colour enters through per-pixel 1×1 convs max-pooled over each token's patch and
    then over its 3×3 neighbourhood of tokens: which colours are near a token, not the outline of
    the region they fill (a colour footprint on the token grid still tells a triangle from a
    diamond). Same token grid, positions and output as :class:`ConvImageEncoder`. On the shapes
    compositional split it names unseen pairs far better than the conv encoder (BENCHMARKS.md).
    """

    def __init__(
        self,
        channels: Sequence[int],
        d_model: int,
        image_size: int,
        patch: int = 4,
        in_channels: int = 3,
        colour_width: int = 32,
    ):
        super().__init__()
        self.stem, width = conv_stages(1, channels, patch, patchify_first=True)
        self.proj = nn.Linear(width, d_model)
        stride = patch * 2 ** (len(channels) - 1)
        self.colour = nn.Sequential(
            nn.Conv2d(in_channels, colour_width, kernel_size=1),
            nn.GELU(),
            nn.Conv2d(colour_width, colour_width, kernel_size=1),
            nn.GELU(),
            # Max, not mean: a mean over the patch grows with the shape's area, which differs by
            # kind, so colour features would carry shape. The max only says which colours are there.
            nn.MaxPool2d(stride),  # [B, Cc, grid, grid]
            nn.MaxPool2d(3, stride=1, padding=1),  # blur the footprint: colour at low resolution
        )
        self.colour_proj = nn.Linear(colour_width, d_model)
        grid = image_size // stride
        self.num_tokens = grid * grid
        self.pos = nn.Parameter(torch.zeros(1, self.num_tokens, d_model))
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        shape = self.stem(saturated_value(images)).flatten(2).transpose(1, 2)  # [B, N, C]
        colour = self.colour(images).flatten(2).transpose(1, 2)  # [B, N, Cc]
        return self.proj(shape) + self.colour_proj(colour) + self.pos  # [B, N, D]
