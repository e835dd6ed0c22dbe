"""A small U-Net generator for image → image translation (pix2pix-style), sized for 32–64 px on a CPU.

Skip connections carry each encoder level to the decoder level of the same resolution, so
pixel-aligned detail (where an outline runs) reaches the output without squeezing through the
bottleneck, while the bottleneck sees the whole image (which region an outline encloses).

``residual=True`` predicts a change to the source instead of the image (its output layer starts
at zero, so G starts as the identity): for translations that keep most pixels (outline → fill,
colourisation) G then spends its capacity on what changes rather than on copying the rest.

Group norm rather than batch norm: the same output in train and eval mode, no running statistics
for DDP to broadcast or FSDP2 to keep in fp32, and it is fine at batch size 1 (``xmodal-generate``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

MAX_WIDTH_MULTIPLE = 8


def group_norm(channels: int) -> nn.GroupNorm:
    """Up to 8 groups, always a divisor of ``channels``."""
    return nn.GroupNorm(math.gcd(8, channels), channels)


def level_widths(width: int, depth: int) -> list[int]:
    """Channels of levels 0 (full resolution) .. depth (bottleneck): doubling, capped at 8 × width."""
    return [width * min(2**i, MAX_WIDTH_MULTIPLE) for i in range(depth + 1)]


def conv_block(c_in: int, c_out: int, act: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), group_norm(c_out), act)


class UNetGenerator(nn.Module):
    """``G(source [B, C_in, H, W]) -> image [B, C_out, H, W]`` in [-1, 1]; H and W divisible by 2^depth."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        width: int = 32,
        depth: int = 3,
        residual: bool = False,
    ):
        super().__init__()
        if residual and in_channels != out_channels:
            raise ValueError(
                f"a residual U-Net needs in_channels == out_channels (got {in_channels}, {out_channels})"
            )
        widths = level_widths(width, depth)
        self.depth = depth
        self.residual = residual
        self.stem = conv_block(in_channels, widths[0], nn.LeakyReLU(0.2))
        # Strided 4×4 convs down (pix2pix's encoder), nearest upsampling + 3×3 convs up: no
        # checkerboard artefacts from transposed convs on flat regions.
        self.down = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1),
                group_norm(widths[i + 1]),
                nn.LeakyReLU(0.2),
            )
            for i in range(depth)
        )
        self.bottleneck = conv_block(widths[depth], widths[depth], nn.ReLU())
        self.up = nn.ModuleList(
            conv_block(widths[i + 1] + widths[i], widths[i], nn.ReLU()) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], out_channels, 1)
        if residual:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        x = self.stem(source)  # [B, w0, H, W]
        skips = [x]
        for down in self.down:
            x = down(x)  # [B, w_{i+1}, H / 2^{i+1}, W / 2^{i+1}]
            skips.append(x)
        x = self.bottleneck(skips.pop())  # [B, w_d, H / 2^d, W / 2^d]
        for up in self.up:
            skip = skips.pop()  # [B, w_i, H / 2^i, W / 2^i]
            x = nn.functional.interpolate(
                x, size=skip.shape[-2:], mode="nearest"
            )  # [B, w_{i+1}, H / 2^i, W / 2^i]
            x = up(torch.cat([x, skip], dim=1))  # [B, w_i, H / 2^i, W / 2^i]
        if self.residual:
            # hardtanh, not tanh: the identity stays exact at init and unsaturated pixels keep slope 1.
            return nn.functional.hardtanh(source + self.head(x))  # [B, C, H, W]
        return torch.tanh(self.head(x))  # [B, C_out, H, W]
