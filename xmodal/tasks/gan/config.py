"""``model`` node of the adversarial family (``model.task=gan``): noise (+ condition) → image."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmodal.nn.diffaugment import POLICIES as DIFFAUGMENT_POLICIES
from xmodal.nn.fusion import FUSIONS
from xmodal.nn.gan import D_POOLS
from xmodal.problems import Problems
from xmodal.tasks.config import (
    ConditionConfig,
    TaskConfig,
    check_slot,
    condition_problems,
    condition_roles,
    judge_label_problems,
    judge_monitor_problems,
    manual_optimization_problems,
)

GAN_LOSSES = ("ns", "hinge", "wgan-gp")
G_UPSAMPLES = ("transpose", "resize")
"""How the built-in G doubles its maps (``up_block`` in xmodal/nn/gan.py)."""


AUX_HEADS = ("shared", "separate")
AUX_MODES = ("ac", "adc")
RECON_LOSSES = ("l1", "l2")


@dataclass
class GanConfig:
    """``model.gan``: DCGAN-style G and D under manual optimization.

    One training batch is one *iteration*: ``n_critic`` D steps (fresh noise, detached fakes),
    then one G step. For this task ``trainer.max_steps`` counts iterations; Lightning is handed
    ``max_steps × (n_critic + 1)`` because it counts every optimizer step.
    """

    z_dim: int = 64
    g_width: int = 32
    """Channels of G's last conv block (earlier blocks double it)."""
    g_upsample: str = "transpose"
    """How the built-in G doubles its maps (xmodal/nn/gan.py): transpose (4×4 stride-2 transposed
    convs, DCGAN) | resize (nearest ×2 + 3×3 conv: no checkerboard pattern to unlearn)."""
    d_width: int = 32
    """Channels of D's first conv block (later blocks double it)."""
    d_pool: str = "sum"
    """How the built-in D reduces its last 4×4 map for its heads (xmodal/nn/gan.py): sum (over
    space: what is drawn) | flatten (keeps the layout: what is drawn where)."""
    loss: str = "hinge"
    """ns (non-saturating, softplus) | hinge | wgan-gp."""
    n_critic: int = 1
    g_lr: float = 2.0e-4
    d_lr: float = 2.0e-4
    g_betas: list[float] = field(default_factory=lambda: [0.0, 0.9])
    d_betas: list[float] = field(default_factory=lambda: [0.0, 0.9])
    gp_weight: float = 10.0
    """Gradient-penalty weight of ``wgan-gp``."""
    r1_weight: float = 0.0
    """Lazy R1 penalty weight on real data (0 = off)."""
    r1_every: int = 16
    """Apply R1 every N D steps (scaled by N: "lazy" regularisation)."""
    spectral_norm: bool = True
    """Spectral normalisation on D's weights."""
    ema_decay: float = 0.999
    """EMA of G's weights (used for samples and metrics); 0 = no EMA."""
    ema_start: int = 0
    """Iterations before the EMA starts (it copies G until then); from there its decay warms up
    as ``min(ema_decay, (1+t)/(10+t))``, so short runs do not average in G's random init."""
    clip_grad_norm: float | None = None
    """Max gradient norm per optimizer step, measured on unscaled gradients (also under 16-mixed)."""
    metric_samples: int = 512
    """Evaluation rows scored per pass and rank (real and generated alike, one sample per row's
    condition): metrics are exact across rank counts when this covers the split (512 = shapes val)."""
    feature_steps: int = 1000
    """Training steps of the cached domain classifier that supplies FID/KID features (one-time)."""
    inception_weights: str | None = None
    """Path to torch-fidelity InceptionV3 weights: FID/KID on Inception features instead."""
    aux_weight: float = 0.0
    """AC-GAN: D also classifies real images by ``label`` (cross-entropy), and G is pushed toward
    images D classifies as their row's label, both weighted by this (0 = off). Rows without a
    label (-1) are left out; needs labels in the data and the built-in D (or one with ``score``)."""
    aux_labels: dict[str, int] = field(default_factory=dict)
    """More attributes the AC-GAN head classifies beside ``label``, role → classes (``{colour: 6}``:
    label roles of ``data.roles``, as ``judge_labels``): D learns each on real images and G is
    pushed toward each row's, in one loss per attribute, all weighted by ``aux_weight``."""
    aux_mode: str = "ac"
    """What the class head learns: ``ac`` (AC-GAN: the real images' classes; G pushed toward its
    row's) | ``adc`` (ADC-GAN, Hou et al. 2022: 2K classes, real class k and fake class k, D
    learning G's samples as the fake ones, G pushed toward the real class of its row), so
    patterns G finds to please the head are learnt as fake and stop pleasing it."""
    aux_head: str = "shared"
    """Where D's AC-GAN class logits come from: ``shared`` (a linear layer on D's adversarial
    features) or ``separate`` (a small classifier of its own, no spectral norm, at ``aux_lr`` with
    β = (0.9, 0.999)): shared features kept the shapes kind at chance on real images (BENCHMARKS.md)."""
    aux_lr: float = 1e-3
    """Learning rate of the ``separate`` class head (D's optimizer, its own parameter group)."""
    aux_warmup_steps: int = 0
    """Steps of training D's class head on the train split's real images (the label and each of
    ``aux_labels``) before the first GAN iteration (batch 64, 2-px random shifts, Adam at
    ``aux_lr``), so G's class loss means something from its first step; 0 = off. With the shared
    head, D's features under it learn too (a classifier-initialised D). Only with ``aux_weight``
    > 0 (else ignored); not on a resumed run; refused under FSDP2."""
    mismatch_weight: float = 0.0
    """Matching-aware D (GAN-INT-CLS): real images paired with another row's condition are scored
    as fake, weighted by this (0 = off). Teaches D, and so G, that the image must match the condition."""
    recon_weight: float = 0.0
    """Paired reconstruction (pix2pix's L1 term): G's image for a row is also pulled toward that
    row's real image, the ``recon_loss`` distance weighted by this (0 = off). Worth it where the condition
    nearly fixes the image (the built-in shapes: a caption names each shape's kind, colour, size
    and cell); on one-to-many data (a photo's caption) it trades sample diversity for fidelity."""
    recon_loss: str = "l1"
    """The reconstruction distance: l1 (pix2pix; pulls toward the per-pixel median) or l2 (the mean)."""
    recon_warmup_steps: int = 0
    """The first this many iterations train G on the reconstruction distance alone, at
    ``recon_warmup_lr``, with D idle (one optimizer step each; 0 = off). The condition path learns
    what a caption draws far faster by regression than through D's gradient; the GAN then sharpens."""
    recon_warmup_lr: float = 3.0e-3
    """G's learning rate during ``recon_warmup_steps`` (``g_lr`` after it)."""
    diffaugment: list[str] = field(default_factory=list)
    """DiffAugment ops applied to every image D sees, real and generated alike (xmodal/nn/diffaugment.py):
    any of translation, cutout, color, in order; [] = off. Keeps D from memorising small data."""
    judge_steps: int = 1500
    """Training steps of the independent judge classifier (``judge_acc``: conditional accuracy by a
    net that is not the FID feature net; cached, one-time; conditional GANs only). 0 = no judge."""
    judge_labels: dict[str, int] = field(default_factory=dict)
    """More attributes to judge, role → classes (``{colour: 6}``): each a label role of
    ``data.roles`` with a judge of its own (same recipe and steps), logged as
    ``judge_<role>_acc`` / ``judge_<role>_real_acc``. {} = the class label's judge only."""
    cycle_captioner: str | None = None
    """Path to an image → text captioner checkpoint (``xmodal-train`` of the caption task on the same
    data, same ``data.image_size``): at val/test it captions the generated images (greedy) and
    CIDEr-D / BLEU-4 against each row's captions give ``cycle_cider`` / ``cycle_bleu4``
    (xmodal/metrics/cycle.py). None = off."""


@dataclass
class GanModelConfig(ConditionConfig, TaskConfig):
    """A (conditional) GAN over the ``target`` role; conditioned through one condition-encoder slot."""

    task: str = "gan"
    target: str = "image"
    """Batch role G generates and D judges (``image``)."""
    gan: GanConfig = field(default_factory=GanConfig)
    fusion: str = "cbn"
    """How the built-in G takes its condition (xmodal/nn/fusion.py): ``cbn`` (conditional batch
    norm from the pooled vector) | ``concat`` (pooled vector concatenated to the noise and to
    every feature map) | ``film`` (per-block FiLM γ, β from an MLP, after a plain norm) |
    ``cross_attention`` (the 8×8 and 16×16 maps attend over the condition's tokens and padding
    mask) | ``placed_attention`` (``cbn``, and the 4×4 seed and 8×8 map attend over the tokens
    with a learned embedding of each cell's place in its query). D keeps its projection head
    whatever the choice."""
    generator: Any = None
    """``_target_`` of any G called as ``G(z [B, z_dim], batch) -> images [B, C, H, W]`` in [-1, 1];
    unset = the built-in DCGAN generator (conditional BN)."""
    discriminator: Any = None
    """``_target_`` of any D called as ``D(images, batch) -> logits [B]``; unset = the built-in
    (projection head, spectral norm)."""

    def roles(self) -> tuple[str, ...]:
        return condition_roles(self.target, self.condition)

    def judged(self) -> bool:
        """The judges train and score this run (the task's own test: a conditional GAN)."""
        return self.gan.judge_steps > 0 and bool(self.conditions())

    def optional_roles(self) -> tuple[str, ...]:
        classified = tuple(self.gan.aux_labels) if self.gan.aux_weight > 0 else ()
        return tuple(dict.fromkeys((*classified, *(self.gan.judge_labels if self.judged() else ()))))

    def lightning_max_steps(self, max_steps: int) -> int:
        if max_steps <= 0:
            return max_steps
        warmup = min(self.gan.recon_warmup_steps, max_steps)  # G alone: one optimizer step each
        return warmup + (max_steps - warmup) * (self.gan.n_critic + 1)

    def problems(self, cfg: Any) -> list[str]:
        p = Problems(cfg)
        g = self.gan
        p.check(self.target == "image", "model.target", f"the {self.task} task generates images")
        condition_problems(p, self, self.target)
        p.one_of("model.fusion", tuple(FUSIONS))
        if self.fusion != "cbn" and self.fusion in FUSIONS:
            p.check(bool(self.conditions()), "model.fusion", "fuses a condition; model.condition is none")
            p.check(
                self.generator is None, "model.fusion", "applies to the built-in G; model.generator is set"
            )
        if self.generator is None or self.discriminator is None:
            p.check(
                cfg.data.image_size in (32, 64),
                "data.image_size",
                f"the {self.task} task's conv nets take 32 or 64 px",
            )
        p.one_of("model.gan.loss", GAN_LOSSES)
        p.check(g.n_critic >= 1, "model.gan.n_critic", "must be >= 1")
        p.check(g.g_lr > 0 and g.d_lr > 0, "model.gan.g_lr", "g_lr and d_lr must be > 0")
        p.check(0.0 <= g.ema_decay < 1.0, "model.gan.ema_decay", "must be in [0, 1)")
        p.check(g.r1_every >= 1, "model.gan.r1_every", "must be >= 1")
        p.check(g.metric_samples >= 2, "model.gan.metric_samples", "FID needs >= 2 samples")
        p.check(g.aux_weight >= 0 and g.mismatch_weight >= 0, "model.gan.aux_weight", "weights must be >= 0")
        p.check(g.recon_weight >= 0, "model.gan.recon_weight", "must be >= 0")
        p.one_of("model.gan.recon_loss", RECON_LOSSES)
        p.check(g.recon_warmup_steps >= 0, "model.gan.recon_warmup_steps", "must be >= 0")
        p.check(g.recon_warmup_lr > 0, "model.gan.recon_warmup_lr", "must be > 0")
        p.check(
            g.recon_warmup_steps == 0 or bool(self.conditions()),
            "model.gan.recon_warmup_steps",
            "regresses each row's image on its condition: needs a condition (model.condition is none)",
        )
        p.check(
            g.recon_weight == 0 or bool(self.conditions()),
            "model.gan.recon_weight",
            "pulls each row's image toward its pair: needs a condition (model.condition is none)",
        )
        p.check(g.judge_steps >= 0, "model.gan.judge_steps", "must be >= 0")
        judge_label_problems(p, "model.gan.judge_labels", g.judge_labels)
        judge_monitor_problems(
            p, self.judged(), g.judge_labels, "model.gan.judge_steps > 0 and a model.condition"
        )
        p.one_of("model.gan.aux_head", AUX_HEADS)
        p.one_of("model.gan.aux_mode", AUX_MODES)
        p.one_of("model.gan.g_upsample", G_UPSAMPLES)
        p.one_of("model.gan.d_pool", D_POOLS)
        p.check(g.aux_lr > 0, "model.gan.aux_lr", "must be > 0")
        p.check(g.aux_warmup_steps >= 0, "model.gan.aux_warmup_steps", "must be >= 0")
        warms = g.aux_warmup_steps > 0 and g.aux_weight > 0
        p.check(
            not warms or cfg.trainer.strategy not in ("fsdp2", "fsdp", "model_parallel"),
            "model.gan.aux_warmup_steps",
            "runs outside the training loop, which a sharded D cannot: use trainer=ddp or set it to 0",
        )
        # Measured: DDP's reducer then fails on the first G-only backward (a gradient "undefined,
        # but still allreduced"); each of the two alone trains on two ranks.
        p.check(
            not (warms and g.recon_warmup_steps > 0 and cfg.trainer.strategy in ("ddp", "ddp_spawn")),
            "model.gan.recon_warmup_steps",
            "cannot follow the class-head warm-up under DDP: set it or model.gan.aux_warmup_steps to 0",
        )
        judge_label_problems(p, "model.gan.aux_labels", g.aux_labels)
        p.check(
            all(op in DIFFAUGMENT_POLICIES for op in g.diffaugment),
            "model.gan.diffaugment",
            f"ops must be among {DIFFAUGMENT_POLICIES}",
        )
        p.check(
            g.mismatch_weight == 0 or bool(self.conditions()),
            "model.gan.mismatch_weight",
            "needs a condition to mismatch (model.condition is none)",
        )
        p.check(len(g.g_betas) == 2 and len(g.d_betas) == 2, "model.gan.g_betas", "betas are pairs")
        manual_optimization_problems(p, cfg, "GANs")
        if g.inception_weights is not None:
            p.check(Path(g.inception_weights).is_file(), "model.gan.inception_weights", "no such file")
        if g.cycle_captioner is not None:
            from xmodal.metrics.cycle import captioner_problems

            key = "model.gan.cycle_captioner"
            p.check(
                bool(self.conditions()), key, "scores samples against their condition: set model.condition"
            )
            p.extend(captioner_problems(key, g.cycle_captioner, "image", cfg.data))
        check_slot(p, "model.generator", self.generator)
        check_slot(p, "model.discriminator", self.discriminator)
        return p
