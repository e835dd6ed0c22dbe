"""``model`` node of the translation family (``model.task=translation``): paired image → image.

pix2pix-style: a U-Net G maps the ``source`` image to the ``target`` one; a PatchGAN D judges
(source, image) pairs patch by patch. G's loss is the adversarial term plus ``l1_weight`` × L1 to
the target. One training batch is one *iteration* (one D step, then one G step), as for the GAN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from xmodal.problems import Problems
from xmodal.tasks.config import TaskConfig, check_slot, manual_optimization_problems

TRANSLATION_LOSSES = ("lsgan", "ns", "hinge", "none")
EVAL_METRICS = ("l1", "psnr", "ssim")
FID_METRICS = ("fid", "kid")
IMAGE_MODALITY = "image"


@dataclass
class TranslationConfig(TaskConfig):
    """Image → image translation on paired samples (two image roles of one sample)."""

    task: str = "translation"
    source: str = "src"
    """Batch role G reads (an image role of ``data.roles``: members ``key.src.png``)."""
    target: str = "tgt"
    """Batch role G must produce (an image role: members ``key.tgt.png``)."""
    loss: str = "lsgan"
    """Adversarial loss on D's patch logits: lsgan (least squares) | ns (BCE on logits, non-saturating
    G) | hinge | none (L1 only: D is never trained, a step is one G step)."""
    l1_weight: float = 100.0
    """Weight of the L1 distance to the target in G's loss (pix2pix: 100)."""
    g_lr: float = 2.0e-4
    d_lr: float = 2.0e-4
    g_betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    d_betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    g_width: int = 32
    """Channels of the U-Net's full-resolution level (each level down doubles them, up to 8×)."""
    g_depth: int = 3
    """Downsamplings of the U-Net (data.image_size must divide by 2^g_depth)."""
    g_residual: bool = False
    """The U-Net predicts a change to the source (starting as the identity) instead of the image."""
    d_width: int = 32
    """Channels of the PatchGAN's first conv (later ones double, up to 8×)."""
    d_layers: int = 2
    """Stride-2 convs of the PatchGAN: patches of 34 px for 2, 16 px for 1, 70 px for 3."""
    clip_grad_norm: float | None = None
    """Max gradient norm per optimizer step, measured on unscaled gradients (also under 16-mixed)."""
    fid: bool = True
    """Also score FID/KID of translations against targets (features: the cached domain classifier
    trained on the target role's images and labels, ``feature_steps`` Adam steps, one-time)."""
    num_classes: int = 10
    """Label classes of the FID feature classifier (labels from the samples' JSON; others ignored)."""
    feature_steps: int = 1000
    generator: Any = None
    """``_target_`` of any G called as ``G(source [B, C, H, W]) -> [B, C, H, W]`` in [-1, 1];
    unset = the built-in U-Net (xmodal/nn/unet.py)."""
    discriminator: Any = None
    """``_target_`` of any D called as ``D(source, image) -> logits [B, ...]`` (patch logits);
    unset = the built-in PatchGAN (xmodal/nn/patchgan.py)."""

    def roles(self) -> tuple[str, ...]:
        return (self.source, self.target)

    @property
    def adversarial(self) -> bool:
        return self.loss != "none"

    def lightning_max_steps(self, max_steps: int) -> int:
        # Lightning counts optimizer steps: D + G per batch, G alone without the adversarial term.
        return max_steps * (2 if self.adversarial else 1) if max_steps > 0 else max_steps

    def eval_metrics(self) -> tuple[str, ...]:
        """Names of the split-level metrics it logs (as ``val/<name>``, ``test/<name>``)."""
        return EVAL_METRICS + (FID_METRICS if self.fid else ())

    def problems(self, cfg: Any) -> list[str]:
        p = Problems(cfg)
        roles = dict(cfg.data.roles)
        image_roles = sorted(r for r, m in roles.items() if m == IMAGE_MODALITY)
        for key, role in (("model.source", self.source), ("model.target", self.target)):
            p.check(
                roles.get(role, role) == IMAGE_MODALITY,
                key,
                f"must name an image role of the data (data.roles has {', '.join(image_roles) or 'none'})",
            )
        p.check(self.source != self.target, "model.target", "must differ from model.source")
        p.one_of("model.loss", TRANSLATION_LOSSES)
        p.check(self.l1_weight >= 0, "model.l1_weight", "must be >= 0")
        p.check(
            self.adversarial or self.l1_weight > 0,
            "model.l1_weight",
            "must be > 0 when model.loss=none (G would have no loss)",
        )
        p.check(self.g_lr > 0 and self.d_lr > 0, "model.g_lr", "g_lr and d_lr must be > 0")
        p.check(len(self.g_betas) == 2 and len(self.d_betas) == 2, "model.g_betas", "betas are pairs")
        p.check(self.g_width >= 1 and self.d_width >= 1, "model.g_width", "g_width and d_width must be >= 1")
        size = cfg.data.image_size
        if self.generator is None:
            p.check(
                self.g_depth >= 1 and size % 2**self.g_depth == 0,
                "model.g_depth",
                f"must be >= 1 with data.image_size={size} divisible by 2^g_depth",
            )
        if self.discriminator is None:
            p.check(
                self.d_layers >= 1 and size // 2**self.d_layers >= 3,
                "model.d_layers",
                f"must be >= 1 and leave >= 3 px of data.image_size={size} after its 2^d_layers downsampling",
            )
        if self.fid:
            p.check(self.num_classes >= 1, "model.num_classes", "must be >= 1")
            p.check(self.feature_steps >= 1, "model.feature_steps", "must be >= 1")
        logged = [f"val/{name}" for name in self.eval_metrics()]
        p.check(cfg.callbacks.monitor in logged, "callbacks.monitor", f"the translation task logs {logged}")
        manual_optimization_problems(p, cfg, "translation")
        check_slot(p, "model.generator", self.generator)
        check_slot(p, "model.discriminator", self.discriminator)
        return p
