"""Convolutional VAE encoder and decoder over any ``[B, C, H, W]`` target, optionally conditional.

The nets know only (channels, height, width): an image (``[B, 1|3, 32|64, 32|64]``) and a log-mel
spectrogram (``[B, 1, M, T]``) are the same kind of target, so text→image and text→audio share
these modules. A condition vector ``[B, cond_dim]`` (from ``xmodal.nn.condition``) is concatenated
to the encoder's pooled features and, with ``fusion="concat"`` (the default, ``model.fusion``), to
the decoder's latent (the classic CVAE of Sohn et al. 2015). The decoder's other fusions
(xmodal/nn/fusion.py): ``film`` modulates every upsampled map by FiLM γ, β of the pooled vector;
``cross_attention`` lets the 8×8 and 16×16 maps attend over the condition's tokens. Both drop the
latent concat and start as the unconditional decoder (their output layers are zero).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from xmodal.nn.condition import Encoded
from xmodal.nn.fusion import VAE_FUSIONS, CrossAttention2d, FiLM, pooled_view, token_view

LIKELIHOODS = ("bernoulli", "gaussian", "logistic", "laplace")


def num_downsamples(height: int, width: int, bottom: int = 4) -> int:
    """Stride-2 stages that bring the smaller side down to ``bottom`` (32 px → 3, 64 px → 4)."""
    side = min(height, width)
    stages = int(math.log2(side // bottom)) if side >= bottom else 0
    if side != bottom * 2**stages or height % 2**stages or width % 2**stages:
        raise ValueError(f"VAE nets need sides of {bottom}·2^n (e.g. 32 or 64), got {height}×{width}")
    return stages


def _hidden(base: int, z_dim: int) -> int:
    """Width of the MLP between conv features and latents (wide enough not to be the bottleneck)."""
    return max(4 * z_dim, 8 * base)


def _widths(width: int, stages: int) -> list[int]:
    """Channels per stage: doubling from ``width``, capped at 4×, so 64 px does not blow up."""
    return [width * min(2**i, 4) for i in range(stages)]


class ConvEncoder(nn.Module):
    """``x [B, C, H, W]`` (+ ``cond [B, c]``) → posterior mean and log-variance ``[B, Z]`` each."""

    def __init__(self, channels: int, height: int, width: int, base: int, z_dim: int, cond_dim: int = 0):
        super().__init__()
        stages = num_downsamples(height, width)
        layers: list[nn.Module] = []
        in_ch = channels
        for out in _widths(base, stages):
            layers += [nn.Conv2d(in_ch, out, kernel_size=4, stride=2, padding=1), nn.SiLU()]
            in_ch = out
        self.body = nn.Sequential(*layers)
        flat = in_ch * (height >> stages) * (width >> stages)
        hidden = _hidden(base, z_dim)
        self.head = nn.Sequential(nn.Linear(flat + cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, 2 * z_dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x).flatten(1)  # [B, F]
        if cond is not None:
            h = torch.cat([h, cond.to(h.dtype)], dim=1)  # [B, F + c]
        mu, logvar = self.head(h).chunk(2, dim=1)  # [B, Z] each
        return mu, logvar


class ConditionalPrior(nn.Module):
    """Pooled condition ``[B, c]`` → the prior's mean and log variance ``[B, Z]`` each. The last
    layer starts at zero, so training starts from the standard normal prior."""

    def __init__(self, cond_dim: int, z_dim: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, 2 * z_dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(cond).chunk(2, dim=-1)  # [B, Z] each
        return mu, logvar


class LikelihoodHead(nn.Module):
    """What the 2-D and 3-D VAE decoders share: the scale of their likelihood and the split of the
    output conv into ``(location, log_scale)``, whatever the number of spatial/time axes."""

    likelihood: str

    def init_scale(self, likelihood: str, channels: int, learn_sigma: bool, sigma: float) -> None:
        """gaussian/laplace: one log σ per channel, a parameter (``learn_sigma``) or a fixed buffer."""
        self.log_sigma: nn.Parameter | None = None
        if likelihood in ("gaussian", "laplace"):
            init = torch.full((channels,), math.log(sigma))
            if learn_sigma:
                self.log_sigma = nn.Parameter(init)
            else:
                self.register_buffer("fixed_log_sigma", init, persistent=False)

    def likelihood_params(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The output conv's ``[B, k·C, ...]`` → ``(location, log_scale)`` (see ConvDecoder)."""
        if self.likelihood == "bernoulli":
            return out, None
        if self.likelihood == "logistic":
            location, log_scale = out.chunk(2, dim=1)  # [B, C, ...] each
            return torch.tanh(location), log_scale.clamp(min=-7.0)
        log_sigma = self.log_sigma if self.log_sigma is not None else self.fixed_log_sigma
        return out, log_sigma.view(1, -1, *([1] * (out.dim() - 2))).expand_as(out)


class ConvDecoder(LikelihoodHead):
    """``z [B, Z]`` (+ ``cond [B, c]`` or its :class:`Encoded` views) → the likelihood's
    parameters for ``[B, C, H, W]``.

    ``fusion`` (one of :data:`xmodal.nn.fusion.VAE_FUSIONS`) is how a condition enters: ``concat``
    (to z: the modules and numbers of the decoder before ``model.fusion``), ``film`` (a
    :class:`FiLM` after each upsampling block) or ``cross_attention`` (a :class:`CrossAttention2d`
    after the blocks whose smaller side is 8 or 16 px; it reads ``cond.tokens`` and ``cond.mask``,
    a bare pooled vector counting as one token). Returns ``(location, log_scale)``: location holds logits (bernoulli) or means (others);
    log_scale is None for bernoulli, a per-pixel output for ``logistic``, and for gaussian/laplace
    either a learned per-channel parameter (``learn_sigma``) or the fixed ``log(sigma)``. The scale
    lives here, inside a module FSDP2 shards, so every trainable parameter is synced.
    """

    def __init__(
        self,
        channels: int,
        height: int,
        width: int,
        base: int,
        z_dim: int,
        cond_dim: int = 0,
        likelihood: str = "bernoulli",
        learn_sigma: bool = False,
        sigma: float = 0.1,
        fusion: str = "concat",
        heads: int = 4,
    ):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if fusion not in VAE_FUSIONS:
            raise ValueError(f"fusion must be one of {VAE_FUSIONS}, got {fusion!r}")
        conditional = cond_dim > 0
        self.concat = fusion == "concat" or not conditional
        self.likelihood = likelihood
        self.channels = channels
        stages = num_downsamples(height, width)
        widths = _widths(base, stages)[::-1]
        self.bottom = (widths[0], height >> stages, width >> stages)
        self.stem = nn.Sequential(
            nn.Linear(z_dim + (cond_dim if self.concat else 0), _hidden(base, z_dim)),
            nn.SiLU(),
            nn.Linear(_hidden(base, z_dim), math.prod(self.bottom)),
            nn.SiLU(),
        )
        layers: list[nn.Module] = []
        for i, in_ch in enumerate(widths):
            out = widths[i + 1] if i + 1 < len(widths) else base
            layers += [nn.ConvTranspose2d(in_ch, out, kernel_size=4, stride=2, padding=1), nn.SiLU()]
        self.body = nn.Sequential(*layers)  # (ConvTranspose2d, SiLU) per block
        per_pixel = 2 if likelihood == "logistic" else 1
        self.out = nn.Conv2d(base, per_pixel * channels, kernel_size=3, padding=1)
        # Built after the plain layers, so those draw the unconditional decoder's initial values;
        # empty (no state_dict keys) for concat, whose parameters stay the plain CVAE's.
        outs = [widths[i + 1] if i + 1 < len(widths) else base for i in range(len(widths))]
        use_film = conditional and fusion == "film"
        self.film = nn.ModuleList(FiLM(out, cond_dim) for out in outs if use_film)
        # Block i's map has a smaller side of 8·2^i px; keyed by block index, as in the GAN's G.
        side = min(height, width) >> stages
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
        h = self.stem(z).view(-1, *self.bottom)  # [B, C0, h, w]
        for i in range(len(self.body) // 2):
            h = self.body[2 * i + 1](self.body[2 * i](h))  # [B, Ci, 2h, 2w]
            if pooled is not None and len(self.film):
                h = self.film[i](h, pooled)
            if cond is not None and str(i) in self.attend:
                h = self.attend[str(i)](h, token_view(cond))
        out = self.out(h)  # [B, k·C, H, W]
        return self.likelihood_params(out)
