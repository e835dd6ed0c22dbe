"""DCGAN-style generator and discriminator for 32/64 px images, with the condition in two slots.

The condition (a class label, caption tokens or a log-mel clip) becomes one vector per sample
through a condition encoder (:mod:`xmodal.nn.condition`) owned by each network; G reads it through
the fusion ``model.fusion`` names (:mod:`xmodal.nn.fusion`: conditional batch norm by default,
concat, FiLM, or cross-attention over the condition's tokens, with or without each cell's
place), D through a projection head (Miyato & Koyama 2018). So label→image, text→image and
audio→image are the same nets with a different encoder: a config, not a module.

Both nets take the batch dict (``G(z, batch)``, ``D(images, batch)``) so a task can swap them for
anything with the same call signature (the tests use tiny MLPs on 2-D points).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xmodal.nn.condition import build_condition_encoder, encode_condition
from xmodal.nn.fusion import FUSIONS, ConditionalBatchNorm2d, CrossAttention2d
from xmodal.nn.slots import build_slot


class SpectralNorm(nn.Module):
    """``layer`` (Conv2d or Linear) with its weight divided by its largest singular value.

    Our own (not ``torch.nn.utils.parametrizations``): one power iteration per training forward
    under ``no_grad`` on whatever weight the layer holds at call time, so it works unchanged on
    FSDP2's unsharded parameters, and ``u``/``v`` are plain buffers (saved, identical on all ranks
    because every rank iterates on identical weights). ``sigma`` uses clones of ``u``/``v`` so the
    in-place buffer update never touches a tensor saved for backward (the DDP "modified by an
    inplace operation" trap).
    """

    def __init__(self, layer: nn.Conv2d | nn.Linear, eps: float = 1e-12):
        super().__init__()
        self.layer = layer
        self.eps = eps
        out_features = layer.weight.shape[0]
        in_features = layer.weight[0].numel()
        self.register_buffer("u", F.normalize(torch.randn(out_features), dim=0, eps=eps))
        self.register_buffer("v", F.normalize(torch.randn(in_features), dim=0, eps=eps))

    def normalized_weight(self) -> torch.Tensor:
        weight = self.layer.weight
        matrix = weight.flatten(1)  # [out, in·k·k]
        if self.training:
            with torch.no_grad():
                mat = matrix.detach().float()
                v = F.normalize(mat.t() @ self.u, dim=0, eps=self.eps)  # [in·k·k]
                u = F.normalize(mat @ v, dim=0, eps=self.eps)  # [out]
                self.v.copy_(v)
                self.u.copy_(u)
        u, v = self.u.clone().to(matrix.dtype), self.v.clone().to(matrix.dtype)
        sigma = torch.dot(u, matrix @ v)
        return weight / sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.normalized_weight()
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, weight, self.layer.bias)
        return F.linear(x, weight, self.layer.bias)


def maybe_sn(layer: nn.Conv2d | nn.Linear, spectral_norm: bool) -> nn.Module:
    return SpectralNorm(layer) if spectral_norm else layer


def _blocks(image_size: int) -> int:
    """Doublings from the 4×4 seed to ``image_size`` (3 for 32 px, 4 for 64 px)."""
    if image_size not in (32, 64):
        raise ValueError(f"the DCGAN nets take 32 or 64 px images (got {image_size})")
    return int(math.log2(image_size // 4))


def up_block(c_in: int, c_out: int, upsample: str) -> nn.Module:
    """×2 upsampling ``[B, c_in, h, w]`` → ``[B, c_out, 2h, 2w]``: a 4×4 stride-2 transposed conv
    (DCGAN), or nearest-neighbour ×2 then a 3×3 conv, which has no uneven kernel overlap and so no
    checkerboard to unlearn (Odena et al. 2016): a short run's samples are drawn, not patterned."""
    if upsample == "transpose":
        return nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False)
    if upsample != "resize":
        raise ValueError(f"upsample must be 'transpose' or 'resize', got {upsample!r}")
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    )


class Generator(nn.Module):
    """z ``[B, Z]`` (+ condition) → images ``[B, C, H, W]`` in [-1, 1]: 4×4 seed, transposed convs.

    ``fusion`` (a name of :data:`xmodal.nn.fusion.FUSIONS`) is how the condition enters; with
    ``cbn`` the modules and their names are those of the generator before ``model.fusion``, so
    older checkpoints load. An unconditional G has plain affine norms whatever the fusion.
    """

    def __init__(
        self,
        z_dim: int,
        width: int,
        image_size: int,
        channels: int,
        cond: nn.Module | None,
        cond_dim: int,
        fusion: str = "cbn",
        heads: int = 4,
        upsample: str = "transpose",
    ):
        super().__init__()
        n = _blocks(image_size)
        widths = [width * 2 ** (n - 1 - i) for i in range(n)] + [width]  # e.g. 256,128,64,64
        self.z_dim = z_dim
        self.cond = cond
        spec = FUSIONS[fusion] if cond is not None else FUSIONS["cbn"]
        c_dim = cond_dim if cond is not None else None

        def norm(channels: int) -> nn.Module:
            return spec.norm(channels, c_dim) if c_dim is not None else ConditionalBatchNorm2d(channels, None)

        self.noise_concat = spec.noise_concat and cond is not None
        self.seed_width = widths[0]
        self.fc = nn.Linear(z_dim + (cond_dim if self.noise_concat else 0), widths[0] * 16)
        self.seed_bn = norm(widths[0])
        self.ups = nn.ModuleList(up_block(widths[i], widths[i + 1], upsample) for i in range(n))
        self.bns = nn.ModuleList(norm(widths[i + 1]) for i in range(n))
        # Block i outputs an 8·2^i px map, keyed by block index; "seed" is the 4×4 map (empty,
        # so no keys, for cbn: older checkpoints load).
        sides = {"seed": (widths[0], 4), **{str(i): (widths[i + 1], 8 * 2**i) for i in range(n)}}
        self.attend = nn.ModuleDict(
            {
                key: CrossAttention2d(
                    c,
                    cond_dim,
                    heads,
                    cells=side * side if spec.placed else 0,
                    content=not (spec.placed and key == "seed"),
                )
                for key, (c, side) in sides.items()
                if cond is not None and side in spec.attention_sizes
            }
        )
        self.out = nn.Conv2d(widths[-1], channels, 3, padding=1)

    def forward(self, z: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        encoded = None
        if self.cond is None:
            c = None
        elif len(self.attend):
            encoded = encode_condition(self.cond, batch)  # tokens [B, T, cond_dim] + mask [B, T]
            c = encoded.pooled
        else:
            c = self.cond(batch)  # [B, cond_dim]
        if self.noise_concat:
            z = torch.cat([z, c.to(z.dtype)], dim=1)  # [B, Z + cond_dim]
        x = self.fc(z).view(z.shape[0], self.seed_width, 4, 4)  # [B, W0, 4, 4]
        x = F.relu(self.seed_bn(x, c))
        if encoded is not None and "seed" in self.attend:
            x = self.attend["seed"](x, encoded)  # [B, W0, 4, 4]
        for i, (up, bn) in enumerate(zip(self.ups, self.bns, strict=True)):
            x = F.relu(bn(up(x), c))  # [B, Wi, 2h, 2w]
            if encoded is not None and str(i) in self.attend:
                x = self.attend[str(i)](x, encoded)  # [B, Wi, 2h, 2w]
        return torch.tanh(self.out(x))  # [B, C, H, W]


D_POOLS = ("sum", "flatten")
"""How the built-in D reduces its last 4×4 map before its heads (``model.gan.d_pool``)."""


class Discriminator(nn.Module):
    """Images ``[B, C, H, W]`` (+ condition) → one logit per image ``[B]`` (projection head).

    ``pool="sum"`` sums the last 4×4 map over space (SNGAN's projection D): the heads see what is
    drawn, not where. ``pool="flatten"`` keeps the map's layout (DCGAN's last 4×4 conv), so the
    projection and the class head can check *which* cell holds the named shape: a caption names
    shapes by place, and a sum cannot tell "a red circle at the top and a blue square at the
    bottom" from its swap.
    """

    def __init__(
        self,
        width: int,
        image_size: int,
        channels: int,
        cond: nn.Module | None,
        cond_dim: int,
        spectral_norm: bool = True,
        num_classes: int = 0,
        aux_head: str = "shared",
        pool: str = "sum",
    ):
        super().__init__()
        if pool not in D_POOLS:
            raise ValueError(f"pool must be one of {D_POOLS}, got {pool!r}")
        n = _blocks(image_size)
        widths = [width * 2**i for i in range(n)]  # e.g. 64,128,256 (+1 block at 64 px)
        layers: list[nn.Module] = []
        prev = channels
        for w in widths:
            layers += [maybe_sn(nn.Conv2d(prev, w, 4, stride=2, padding=1), spectral_norm), nn.LeakyReLU(0.2)]
            prev = w
        self.features = nn.Sequential(*layers)
        self.cond = cond
        self.pool = pool
        # The last map is 4×4: flattened, every head sees where each feature is (16× the inputs).
        feature_dim = prev * 16 if pool == "flatten" else prev
        self.head = maybe_sn(nn.Linear(feature_dim, 1), spectral_norm)
        self.project = maybe_sn(nn.Linear(cond_dim, feature_dim), spectral_norm) if cond is not None else None
        # AC-GAN head (model.gan.aux_weight): class logits from the same features. Not
        # spectrally normalised: it is trained by cross-entropy, not by the adversarial loss.
        self.classes = nn.Linear(feature_dim, num_classes) if num_classes > 0 else None
        # aux_head=separate: the class logits from a classifier of its own (model.gan.aux_head).
        self.classifier = (
            ClassHead(channels, width, n, num_classes, image_size)
            if num_classes > 0 and aux_head == "separate"
            else None
        )
        if self.classifier is not None:
            self.classes = None

    def score(self, images: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(adversarial logits ``[B]``, class logits ``[B, K]`` or None without a class head)."""
        h = self.pooled(images)  # [B, 16·W] flattened or [B, W] summed
        logits = self.head(h).squeeze(1)  # [B]
        if self.project is not None:
            c = self.cond(batch)  # [B, cond_dim]
            logits = logits + (self.project(c) * h).sum(1)  # projection: <embed(y), h>
        if self.classifier is not None:
            return logits, self.classifier(images)
        return logits, self.classes(h) if self.classes is not None else None

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """What D's heads read: its last 4×4 map ``[B, W, 4, 4]`` summed ``[B, W]`` or flattened ``[B, 16·W]``."""
        fmap = self.features(images)  # [B, W, 4, 4]
        return fmap.flatten(1) if self.pool == "flatten" else fmap.sum(dim=(2, 3))

    def class_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The AC-GAN head's logits ``[B, K]`` alone (no condition needed: the warm-up's classifier)."""
        if self.classifier is not None:
            return self.classifier(images)
        return self.classes(self.pooled(images))

    def class_parameters(self) -> list[nn.Parameter]:
        """What the class logits depend on: the separate head, or the shared features and head."""
        if self.classifier is not None:
            return list(self.classifier.parameters())
        return [*self.features.parameters(), *self.classes.parameters()]

    @property
    def has_classes(self) -> bool:
        return self.classes is not None or self.classifier is not None

    def forward(self, images: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return self.score(images, batch)[0]


class ClassHead(nn.Module):
    """Images ``[B, C, H, W]`` → class logits ``[B, K]``: strided convs (no spectral norm: trained by
    cross-entropy on real images only) down to 4×4, flattened, a linear layer. Flattened, not
    pooled: which shape a caption names first is told by where it is (a pooled head stayed at
    chance on the shapes kind, measured)."""

    def __init__(self, channels: int, width: int, blocks: int, num_classes: int, image_size: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        prev = channels
        for i in range(blocks):
            layers += [nn.Conv2d(prev, width * 2**i, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            prev = width * 2**i
        self.features = nn.Sequential(*layers)
        side = image_size >> blocks
        self.out = nn.Linear(prev * side * side, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(images).flatten(1))  # [B, K]


def aux_classes(model: Any) -> int:
    """Logits of D's AC-GAN head when ``model.gan.aux_weight > 0`` (else 0): ``model.num_classes``
    for the label, then each of ``model.gan.aux_labels`` in order (``aux_slices``); twice as many
    under ``model.gan.aux_mode=adc`` (a real and a fake logit per class)."""
    if model.gan.aux_weight <= 0:
        return 0
    return aux_slices(model)[-1][2]


def aux_slices(model: Any) -> list[tuple[str, int, int]]:
    """(role, first logit, end) of each attribute in the AC-GAN head's logits: ``label`` first.
    Under ``aux_mode=adc`` an attribute of K classes has 2K logits: real class k at k, fake at K + k."""
    per_class = 2 if getattr(model.gan, "aux_mode", "ac") == "adc" else 1
    slices, start = [], 0
    for role, classes in {"label": model.num_classes, **(model.gan.aux_labels or {})}.items():
        slices.append((role, start, start + per_class * int(classes)))
        start += per_class * int(classes)
    return slices


def build_gan_nets(
    model: Any, vocab_size: int, pad_id: int, data: dict[str, Any]
) -> tuple[nn.Module, nn.Module]:
    """G and D from the typed ``model`` node (each with its own condition encoder, so G's and D's
    optimizers never share a parameter); a ``model.generator`` / ``model.discriminator``
    ``_target_`` replaces the built-in net."""
    g = model.gan

    def encoder() -> nn.Module | None:
        return build_condition_encoder(
            model, vocab_size, pad_id, data["max_text_len"], data["audio_mels"], data["audio_frames"]
        )

    size, channels, cond_dim = data["image_size"], data["image_channels"], model.cond_dim
    generator = build_slot(
        model.generator,
        lambda: Generator(
            g.z_dim, g.g_width, size, channels, encoder(), cond_dim, model.fusion, model.heads, g.g_upsample
        ),
    )
    discriminator = build_slot(
        model.discriminator,
        lambda: Discriminator(
            g.d_width,
            size,
            channels,
            encoder(),
            cond_dim,
            g.spectral_norm,
            aux_classes(model),
            g.aux_head,
            g.d_pool,
        ),
    )
    return generator, discriminator
