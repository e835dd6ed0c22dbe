"""PatchGAN discriminator (pix2pix): one real/fake logit per overlapping patch of a (source, image) pair.

Conditioned on the source by channel concatenation, so it judges whether the image is a plausible
translation of *this* source, not merely a plausible image. Judging patches rather than the whole
image leaves the global layout to G's L1 term and spends D on local sharpness.
"""

from __future__ import annotations

import torch
from torch import nn

from xmodal.nn.unet import MAX_WIDTH_MULTIPLE, group_norm


def patch_size(layers: int) -> int:
    """Receptive field (px) of one logit: ``layers`` stride-2 4×4 convs, then two stride-1 ones."""
    field = 1
    for stride in [1, 1] + [2] * layers:  # walked from the logit back to the input
        field = (field - 1) * stride + 4
    return field


class PatchDiscriminator(nn.Module):
    """``D(source [B, C, H, W], image [B, C, H, W]) -> logits [B, 1, H / 2^layers - 2, W / 2^layers - 2]``."""

    def __init__(self, channels: int = 3, width: int = 32, layers: int = 2):
        super().__init__()
        # No norm on the first conv (pix2pix): it would erase the input's absolute levels.
        blocks: list[nn.Module] = [nn.Conv2d(2 * channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = width
        for i in range(1, layers + 1):
            out = width * min(2**i, MAX_WIDTH_MULTIPLE)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(c, out, 4, stride=stride, padding=1), group_norm(out), nn.LeakyReLU(0.2)]
            c = out
        blocks.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, source: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        pair = torch.cat([source, image.to(source.dtype)], dim=1)  # [B, 2C, H, W]
        return self.net(pair)  # [B, 1, h, w] patch logits
