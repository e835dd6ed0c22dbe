"""Video nets over clips ``[B, C, T, H, W]``: a spatio-temporal token encoder for the captioner, and
a 3-D conv VAE encoder/decoder pair for text → video.

Time is a convolution axis like height and width (3×3×3 kernels), so a token's features can hold
how the content moved across the frames it covers; one frame (T = 1) runs through the same nets
(the temporal kernels then see zero padding either side), which is the single-frame baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from xmodal.nn.condition import Encoded
from xmodal.nn.fusion import VAE_FUSIONS, CrossAttention2d, FiLM, pooled_view, token_view
from xmodal.nn.vae import LikelihoodHead, _hidden, _widths  # the 2-D VAE's widths: both scale alike


def _halved(n: int, stages: int) -> int:
    """Length after ``stages`` stride-2, padding-1, kernel-3 convolutions (ceil(n / 2) each)."""
    for _ in range(stages):
        n = (n - 1) // 2 + 1
    return n


class VideoEncoder(nn.Module):
    """Clip → tokens ``[B, T'·h·w, D]``: per-frame ``patch``×``patch`` patches, then 3×3×3
    spatio-temporal conv stages, each later one halving time, height and width.

    At 32 px, 8 frames, ``patch=4`` and two stages: 8×8 patches per frame → 4×4×4 = 64 tokens, each
    with a learned position embedding over (time, row, column), so the decoder's cross-attention
    can compare where the shape is early and late in the clip (its motion).
    """

    def __init__(
        self,
        channels: Sequence[int],
        d_model: int,
        image_size: int,
        frames: int,
        patch: int = 4,
        in_channels: int = 3,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for stage, out in enumerate(channels):
            down = (
                nn.Conv3d(width, out, kernel_size=(1, patch, patch), stride=(1, patch, patch))
                if stage == 0
                else nn.Conv3d(width, out, kernel_size=3, stride=2, padding=1)
            )
            layers += [
                down,
                nn.GroupNorm(min(8, out), out),
                nn.GELU(),
                nn.Conv3d(out, out, kernel_size=3, padding=1),  # mixes neighbouring frames
                nn.GroupNorm(min(8, out), out),
                nn.GELU(),
            ]
            width = out
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Linear(width, d_model)
        later = len(channels) - 1
        self.grid = (
            _halved(frames, later),
            _halved(image_size // patch, later),
            _halved(image_size // patch, later),
        )
        self.num_tokens = math.prod(self.grid)
        self.pos = nn.Parameter(torch.zeros(1, self.num_tokens, d_model))
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        features = self.stem(clips)  # [B, C, T', h, w] from clips in [-1, 1]
        tokens = features.flatten(2).transpose(1, 2)  # [B, T'·h·w, C]
        return self.proj(tokens) + self.pos  # [B, N, D]


def _vae_stages(height: int, width: int, bottom: int = 4) -> int:
    """Stride-2 stages that bring the frame side to ``bottom`` (32 px → 3); time halves with them
    while it is longer than 1."""
    stages = int(math.log2(max(height // bottom, 1)))
    if height != width or height != bottom * 2**stages:
        raise ValueError(f"video VAE nets need square frames of 4·2^n px (e.g. 32), got {height}×{width}")
    return stages


def _time_strides(frames: int, stages: int) -> list[int]:
    """Stride along time per stage: 2 while the remaining length is even, else 1 (a 1-frame clip
    keeps its one step), so the decoder can mirror the encoder exactly."""
    strides = []
    for _ in range(stages):
        strides.append(2 if frames % 2 == 0 else 1)
        frames //= strides[-1]
    return strides


class VideoVaeEncoder(nn.Module):
    """``x [B, C, T, H, W]`` (+ ``cond [B, c]``) → posterior mean and log-variance ``[B, Z]`` each."""

    def __init__(
        self, channels: int, frames: int, height: int, width: int, base: int, z_dim: int, cond_dim: int = 0
    ):
        super().__init__()
        stages = _vae_stages(height, width)
        layers: list[nn.Module] = []
        in_ch, t = channels, frames
        for out, ts in zip(_widths(base, stages), _time_strides(frames, stages), strict=True):
            layers += [
                nn.Conv3d(in_ch, out, kernel_size=(3, 4, 4), stride=(ts, 2, 2), padding=(1, 1, 1)),
                nn.GroupNorm(min(8, out), out),
                nn.SiLU(),
            ]
            in_ch, t = out, t // ts
        self.body = nn.Sequential(*layers)
        side = height >> stages
        hidden = _hidden(base, z_dim)
        self.head = nn.Sequential(
            nn.Linear(in_ch * t * side * side + cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, 2 * z_dim)
        )

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x).flatten(1)  # [B, F]
        if cond is not None:
            h = torch.cat([h, cond.to(h.dtype)], dim=1)  # [B, F + c]
        mu, logvar = self.head(h).chunk(2, dim=1)  # [B, Z] each
        return mu, logvar


class VideoVaeDecoder(LikelihoodHead):
    """``z [B, Z]`` (+ ``cond [B, c]`` or its :class:`Encoded` views) → the likelihood's parameters
    for ``[B, C, T, H, W]``.

    ``(location, log_scale)`` as :class:`xmodal.nn.vae.ConvDecoder`: ``logistic`` has a per-pixel
    log-scale output; ``gaussian`` / ``laplace`` a per-channel one, learned (``learn_sigma``) or fixed.
    ``fusion`` as the 2-D decoder's (:data:`xmodal.nn.fusion.VAE_FUSIONS`): ``concat`` (to z: the
    modules and numbers of this decoder before ``model.fusion``), ``film`` (a :class:`FiLM` of the
    pooled vector after each upsampling block, one γ, β per channel over time and space) or
    ``cross_attention`` (a :class:`CrossAttention2d` after the blocks whose frame side is 8 or 16 px,
    its queries the block's ``T·H·W`` cells). Both start as the unconditional decoder.
    """

    def __init__(
        self,
        channels: int,
        frames: int,
        height: int,
        width: int,
        base: int,
        z_dim: int,
        cond_dim: int = 0,
        likelihood: str = "logistic",
        learn_sigma: bool = False,
        sigma: float = 0.1,
        fusion: str = "concat",
        heads: int = 4,
    ):
        super().__init__()
        if likelihood not in ("gaussian", "logistic", "laplace"):
            raise ValueError(
                f"video VAE likelihood must be gaussian, logistic or laplace, got {likelihood!r}"
            )
        if fusion not in VAE_FUSIONS:
            raise ValueError(f"fusion must be one of {VAE_FUSIONS}, got {fusion!r}")
        conditional = cond_dim > 0
        self.concat = fusion == "concat" or not conditional
        self.likelihood = likelihood
        stages = _vae_stages(height, width)
        strides = _time_strides(frames, stages)
        widths = _widths(base, stages)
        self.bottom = (widths[-1], frames // math.prod(strides), height >> stages, width >> stages)
        hidden = _hidden(base, z_dim)
        self.stem = nn.Sequential(
            nn.Linear(z_dim + (cond_dim if self.concat else 0), hidden),
            nn.SiLU(),
            nn.Linear(hidden, math.prod(self.bottom)),
            nn.SiLU(),
        )
        layers: list[nn.Module] = []
        outs: list[int] = []  # channels after each upsampling block, first block first
        for i in reversed(range(stages)):
            out = widths[i - 1] if i > 0 else base
            # Kernel 4, stride 2, padding 1 doubles a length exactly; kernel 3, stride 1 keeps it.
            kernel_t = 4 if strides[i] == 2 else 3
            up = nn.ConvTranspose3d(widths[i], out, (kernel_t, 4, 4), stride=(strides[i], 2, 2), padding=1)
            layers += [up, nn.GroupNorm(min(8, out), out), nn.SiLU()]
            outs.append(out)
        self.body = nn.Sequential(*layers)  # (ConvTranspose3d, GroupNorm, SiLU) per block
        self.out = nn.Conv3d(
            base, (2 if likelihood == "logistic" else 1) * channels, kernel_size=3, padding=1
        )
        # Built after the plain layers, so those draw the unconditional decoder's initial values;
        # empty (no state_dict keys) for concat, whose parameters stay the decoder's as it was.
        use_film = conditional and fusion == "film"
        self.film = nn.ModuleList(FiLM(out, cond_dim) for out in outs if use_film)
        # Block i's frames have a side of bottom·2^(i+1) px; keyed by block index, as in ConvDecoder.
        side = height >> stages
        self.attend = nn.ModuleDict(
            {
                str(i): CrossAttention2d(out, cond_dim, heads)
                for i, out in enumerate(outs)
                if conditional and fusion == "cross_attention" and side * 2 ** (i + 1) in (8, 16)
            }
        )
        self.init_scale(likelihood, channels, learn_sigma, sigma)

    def forward(
        self, z: torch.Tensor, cond: torch.Tensor | Encoded | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        pooled = pooled_view(cond)  # [B, c] | None
        if pooled is not None and self.concat:
            z = torch.cat([z, pooled.to(z.dtype)], dim=1)  # [B, Z + c]
        h = self.stem(z).view(-1, *self.bottom)  # [B, C0, t, h, w]
        for i in range(len(self.body) // 3):
            up, norm, act = self.body[3 * i : 3 * i + 3]
            h = act(norm(up(h)))  # [B, Ci, t·s, 2h, 2w]
            if pooled is not None and len(self.film):
                h = self.film[i](h, pooled)
            if cond is not None and str(i) in self.attend:
                h = self.attend[str(i)](h, token_view(cond))
        return self.likelihood_params(self.out(h))  # from [B, k·C, T, H, W]
