"""How a conditional generator takes its condition (``model.fusion``), one small block per choice.

Every norm site of the DCGAN generator (the 4×4 seed and each upsampled block) is a *fusion
norm*: ``norm(x [B, C, H, W], pooled [B, cond_dim] | None) -> [B, C, H, W]``. The choices:

- ``cbn``: conditional batch norm, scale and shift linear in the pooled vector (the default, and
  the generator as it was before ``model.fusion``: same parameters, same numbers);
- ``concat``: the pooled vector is concatenated to the noise, and tiled over each normalised
  feature map, mixed back to C channels by a 1×1 conv;
- ``film``: plain (affine) batch norm, then FiLM γ, β from a per-block two-layer MLP of the
  pooled vector (Perez et al. 2018);
- ``cross_attention``: plain batch norm everywhere; at the 8×8 and 16×16 blocks the feature map
  attends over the condition's *token* sequence (caption tokens, audio frames) with its padding
  mask, residually;
- ``placed_attention``: conditional batch norm as ``cbn``, and at the 4×4 seed and the 8×8 block
  each cell attends over the tokens with a learned embedding of *where it is* in its query (at
  the seed the place alone: its features are the noise's).
  A caption binds colour and kind to a place ("a purple square on the left and a blue diamond on
  the right"); a pooled vector that modulates every cell alike must encode each conjunction in
  its channels, and the cells of a plain map all ask the same question, so both draw the two
  shapes in the mean of the two colours. A cell that knows its place can read the phrase that
  names it, once the caption encoder hears word order (``model.text_position_std``: without it
  the tokens stay a bag of words and this choice draws as ``cbn`` does; BENCHMARKS.md "Binding
  colours to places").

``cross_attention`` and ``placed_attention`` are the choices that see more than one pooled vector.

Norms normalise in fp32 (see :class:`ConditionalBatchNorm2d`); the new layers that write into the
residual stream start at zero, so every choice starts as the plain generator.

The conditional VAE decoders (2-D: xmodal/nn/vae.py; 3-D video: xmodal/nn/video.py) have no norm
sites the condition sets: they take :class:`FiLM` (the modulation of :class:`FiLMNorm` without its
norm) and :class:`CrossAttention2d` from here, both indifferent to the number of map axes, and
:func:`pooled_view` / :func:`repeat_condition` let one condition argument be a pooled vector or an
:class:`~xmodal.nn.condition.Encoded` (tokens for cross-attention).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xmodal.nn.attention import MultiHeadAttention
from xmodal.nn.condition import Encoded, single_token


class ConditionalBatchNorm2d(nn.Module):
    """Batch norm whose scale and shift come from the condition vector (plain affine BN without one)."""

    def __init__(self, channels: int, cond_dim: int | None):
        super().__init__()
        self.conditional = cond_dim is not None
        self.bn = nn.BatchNorm2d(channels, affine=not self.conditional)
        if cond_dim is not None:
            self.gain = nn.Linear(cond_dim, channels)
            self.bias = nn.Linear(cond_dim, channels)
            nn.init.zeros_(self.gain.weight)
            nn.init.zeros_(self.gain.bias)
            nn.init.zeros_(self.bias.weight)
            nn.init.zeros_(self.bias.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        x = self._normalize_fp32(x).to(x.dtype)  # [B, C, H, W]
        if not self.conditional or cond is None:
            return x
        gain = 1 + self.gain(cond)[:, :, None, None]  # [B, C, 1, 1]
        return x * gain + self.bias(cond)[:, :, None, None]

    def _normalize_fp32(self, x: torch.Tensor) -> torch.Tensor:
        """``self.bn(x)`` computed in fp32 whatever dtype the input and affine weights arrive in.

        Under FSDP2's bf16 parameter policy the affine weights are cast to bf16 while the running
        statistics (buffers) stay fp32, and ``batch_norm`` refuses the mix; fp32 statistics are the
        numerically safe choice under any autocast anyway.
        """
        bn = self.bn
        momentum = bn.momentum
        if bn.training and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as nn.BatchNorm2d does it
                momentum = 1.0 / float(bn.num_batches_tracked)
        weight = bn.weight.float() if bn.weight is not None else None
        bias = bn.bias.float() if bn.bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            return F.batch_norm(
                x.float(),
                bn.running_mean,
                bn.running_var,
                weight,
                bias,
                training=bn.training,
                momentum=momentum or 0.0,
                eps=bn.eps,
            )


def plain_norm(channels: int, cond_dim: int | None = None) -> ConditionalBatchNorm2d:
    """Affine batch norm that ignores the condition (the norm of ``cross_attention``)."""
    return ConditionalBatchNorm2d(channels, None)


class FiLMNorm(nn.Module):
    """Plain affine batch norm, then ``x · (1 + γ(c)) + β(c)`` with γ, β from a two-layer MLP."""

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.norm = ConditionalBatchNorm2d(channels, None)
        self.film = nn.Sequential(nn.Linear(cond_dim, cond_dim), nn.ReLU(), nn.Linear(cond_dim, 2 * channels))
        nn.init.zeros_(self.film[2].weight)  # starts as the identity: γ = 0, β = 0
        nn.init.zeros_(self.film[2].bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        x = self.norm(x, None)  # [B, C, H, W]
        if cond is None:
            return x
        gamma, beta = self.film(cond).chunk(2, dim=1)  # [B, C] each
        return x * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]


class FiLM(nn.Module):
    """``x · (1 + γ(c)) + β(c)`` with γ, β from a two-layer MLP of the pooled vector, no norm
    (:class:`FiLMNorm`'s modulation for nets without norm sites). Starts as the identity. ``x`` is
    ``[B, C, *spatial]``: a 2-D map or a 3-D clip ``[B, C, T, H, W]`` (the video VAE decoder)."""

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(cond_dim, cond_dim), nn.ReLU(), nn.Linear(cond_dim, 2 * channels))
        nn.init.zeros_(self.mlp[2].weight)  # γ = 0, β = 0
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.mlp(cond.to(x.dtype)).chunk(2, dim=1)  # [B, C] each
        # One γ, β per channel over every trailing axis: [B, C, H, W] maps and [B, C, T, H, W] clips.
        per_channel = (*gamma.shape, *([1] * (x.dim() - 2)))  # (B, C, 1, 1[, 1])
        return x * (1 + gamma.view(per_channel)) + beta.view(per_channel)  # as x


def pooled_view(cond: torch.Tensor | Encoded | None) -> torch.Tensor | None:
    """The pooled vector ``[B, cond_dim]`` of a condition given pooled or as :class:`Encoded`."""
    return cond.pooled if isinstance(cond, Encoded) else cond


def token_view(cond: torch.Tensor | Encoded) -> Encoded:
    """A condition as tokens and mask (a pooled vector ``[B, cond_dim]`` is one token)."""
    return cond if isinstance(cond, Encoded) else single_token(cond)


def repeat_condition(cond: torch.Tensor | Encoded | None, times: int) -> torch.Tensor | Encoded | None:
    """Each row of a condition ``times`` times in a row (``repeat_interleave`` on every view)."""
    if cond is None or isinstance(cond, torch.Tensor):
        return None if cond is None else cond.repeat_interleave(times, dim=0)  # [B·m, c]
    rep = lambda t: t.repeat_interleave(times, dim=0)  # noqa: E731
    return Encoded(rep(cond.pooled), rep(cond.tokens), rep(cond.mask))  # [B·m, c], [B·m, T, c], [B·m, T]


class ConcatNorm(nn.Module):
    """Plain affine batch norm, then the pooled vector tiled over the map ``[B, C + c, H, W]``
    and mixed back to ``C`` channels by a 1×1 conv, residually."""

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.norm = ConditionalBatchNorm2d(channels, None)
        self.mix = nn.Conv2d(channels + cond_dim, channels, kernel_size=1)
        nn.init.zeros_(self.mix.weight)  # starts as the plain norm
        nn.init.zeros_(self.mix.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        x = self.norm(x, None)  # [B, C, H, W]
        if cond is None:
            return x
        tiled = cond.to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[2:])  # [B, c, H, W]
        return x + self.mix(torch.cat([x, tiled], dim=1))  # [B, C, H, W]


class CrossAttention2d(nn.Module):
    """Residual cross-attention of a feature map over condition tokens.

    Each of the ``H·W`` cells is a query ``[B, HW, C]`` (layer-normed); keys and values are the
    condition tokens ``[B, T, cond_dim]`` projected to ``C``; padded tokens (``mask`` False) are
    never attended. The output projection starts at zero, so the block starts as the identity.
    A 3-D map ``[B, C, T, H, W]`` (the video VAE decoder) is read the same way, its ``T·H·W``
    cells flattened into the queries.

    ``cells > 0`` (a map of that many cells): a learned embedding of each cell's place joins its
    query. ``content=False``: the place is the whole query, the map's own features do not ask
    (at G's 4×4 seed those are ``fc(z)``, mostly noise; there the place alone drew the shape kind
    better than place + content: BENCHMARKS.md "Binding colours to places").
    """

    def __init__(self, channels: int, cond_dim: int, heads: int, cells: int = 0, content: bool = True):
        super().__init__()
        if not content and cells <= 0:
            raise ValueError("a query without the map's content needs the cells' places (cells > 0)")
        self.norm = nn.LayerNorm(channels) if content else None  # no dead weights without content
        # At the scale of the layer-normed features, so place and content both steer the attention.
        self.place = nn.Parameter(torch.randn(1, cells, channels)) if cells > 0 else None
        self.context = nn.Linear(cond_dim, channels)
        # heads must divide the block's width; fall back to one head for odd widths.
        self.attn = MultiHeadAttention(channels, heads if channels % heads == 0 else 1)
        nn.init.zeros_(self.attn.out.weight)
        nn.init.zeros_(self.attn.out.bias)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """What each cell of ``x [B, C, *spatial]`` asks: ``[B, cells, C]``."""
        cells = x.flatten(2).transpose(1, 2)  # [B, HW, C] (or [B, T·H·W, C])
        if self.place is None:
            return self.norm(cells)
        place = self.place.to(cells.dtype).expand(len(x), -1, -1)  # [B, HW, C]
        return place if self.norm is None else self.norm(cells) + place

    def forward(self, x: torch.Tensor, cond: Encoded) -> torch.Tensor:
        queries = self.queries(x)  # [B, HW, C]
        context = self.context(cond.tokens.to(queries.dtype))  # [B, T, C]
        k, v = self.attn.project_kv(context)  # [B, heads, T, C/heads] each
        y = self.attn.attend(queries, k, v, keep=cond.mask)  # [B, HW, C]
        return x + y.transpose(1, 2).reshape(x.shape)  # [B, C, H, W] (or [B, C, T, H, W])


@dataclass(frozen=True)
class Fusion:
    """One ``model.fusion`` choice: the norm at every site, and what else the generator adds."""

    norm: Callable[[int, int], nn.Module]
    """``(channels, cond_dim)`` → a fusion norm called as ``norm(x, pooled | None)``."""
    noise_concat: bool = False
    """The pooled vector is concatenated to the noise before G's first linear layer."""
    attention_sizes: tuple[int, ...] = ()
    """Feature-map sides (px) after whose block (4: the seed) a :class:`CrossAttention2d` reads the tokens."""
    placed: bool = False
    """The attention's queries carry a learned embedding of their cell (``CrossAttention2d(cells=H·W)``);
    at the 4×4 seed the place is the whole query (``content=False``)."""


FUSIONS: dict[str, Fusion] = {
    "cbn": Fusion(ConditionalBatchNorm2d),
    "concat": Fusion(ConcatNorm, noise_concat=True),
    "film": Fusion(FiLMNorm),
    "cross_attention": Fusion(plain_norm, attention_sizes=(8, 16)),
    "placed_attention": Fusion(ConditionalBatchNorm2d, attention_sizes=(4, 8), placed=True),
}
"""``model.fusion`` name → its blocks; ``cbn`` is the default (xmodal/tasks/gan/config.py)."""

VAE_FUSIONS = ("concat", "film", "cross_attention")
"""The VAE decoder's ``model.fusion`` choices (xmodal/nn/vae.py); ``concat`` is its default. No
``cbn``: the decoder has no batch norm whose scale and shift the condition could set."""
