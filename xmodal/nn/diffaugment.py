"""Differentiable augmentation of everything D sees (DiffAugment, Zhao et al. 2020).

On small data (MNIST-5k's 4,000 digits, a user's few hundred photos) D memorises the real images
within a few epochs and its gradients stop telling G anything. Augmenting real *and* generated
images alike, with ops G's gradient passes through, keeps D from memorising without teaching G to
draw augmented images (both sides see the same distribution of augmentations).

Randomness comes from a ``torch.Generator`` the caller seeds (the GAN seeds it by run seed, rank and
iteration), so a resumed run augments exactly as the uninterrupted one did.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POLICIES = ("translation", "cutout", "color")


def _uniform(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen).to(device)


def translate(x: torch.Tensor, gen: torch.Generator, ratio: float = 0.125) -> torch.Tensor:
    """Each image ``[B, C, H, W]`` shifted by up to ``ratio`` of its size, zero-filled."""
    b, _, h, w = x.shape
    sy, sx = max(int(h * ratio), 1), max(int(w * ratio), 1)
    dy = torch.randint(-sy, sy + 1, (b,), generator=gen).to(x.device)
    dx = torch.randint(-sx, sx + 1, (b,), generator=gen).to(x.device)
    padded = F.pad(x, (sx, sx, sy, sy))  # [B, C, H + 2sy, W + 2sx]
    rows = torch.arange(h, device=x.device)[None] + sy - dy[:, None]  # [B, H]
    cols = torch.arange(w, device=x.device)[None] + sx - dx[:, None]  # [B, W]
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, gen: torch.Generator, ratio: float = 0.5) -> torch.Tensor:
    """A square of ``ratio`` of the size zeroed at a random place in each image."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio), int(w * ratio)
    cy = torch.randint(0, h + (1 - ch % 2), (b,), generator=gen).to(x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (b,), generator=gen).to(x.device)
    rows = torch.arange(h, device=x.device)[None]  # [1, H]
    cols = torch.arange(w, device=x.device)[None]  # [1, W]
    inside_y = (rows >= (cy[:, None] - ch // 2)) & (rows < (cy[:, None] - ch // 2 + ch))  # [B, H]
    inside_x = (cols >= (cx[:, None] - cw // 2)) & (cols < (cx[:, None] - cw // 2 + cw))  # [B, W]
    keep = ~(inside_y[:, :, None] & inside_x[:, None, :])  # [B, H, W]
    return x * keep[:, None].to(x.dtype)


def color(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random brightness, saturation and contrast per image (images in [-1, 1])."""
    b = x.shape[0]
    shape = (b, 1, 1, 1)
    x = x + (_uniform(b, gen, x.device) - 0.5).view(shape)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_uniform(b, gen, x.device) * 2).view(shape) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(b, gen, x.device) + 0.5).view(shape) + mean


def diff_augment(x: torch.Tensor, policy: list[str] | tuple[str, ...], gen: torch.Generator) -> torch.Tensor:
    """``x [B, C, H, W]`` through each op of ``policy`` in order (empty: unchanged)."""
    ops = {"translation": translate, "cutout": cutout, "color": color}
    for name in policy:
        x = ops[name](x, gen)
    return x
