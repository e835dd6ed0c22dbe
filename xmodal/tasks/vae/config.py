"""``model`` node of the VAE family (``model.task=vae``): data → latent → data, optionally conditional."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from xmodal.nn.fusion import VAE_FUSIONS
from xmodal.problems import Problems
from xmodal.tasks.config import (
    ConditionConfig,
    OptimizerConfig,
    TaskConfig,
    check_slot,
    condition_problems,
    condition_roles,
    judge_label_problems,
    judge_monitor_problems,
    optimizer_problems,
)

VAE_LIKELIHOODS = ("bernoulli", "gaussian", "logistic", "laplace")
VAE_PRIORS = ("standard", "conditional")
TARGETS = ("image", "audio", "video")


@dataclass
class VaeConfig:
    """``model.vae``: ELBO in nats, β, KL warm-up, IWAE evaluation."""

    z_dim: int = 32
    width: int = 32
    """Channels of the first encoder conv block (later blocks double it, capped at 4×; the decoder mirrors it)."""
    likelihood: str = "bernoulli"
    """bernoulli (logits; binarised data) | gaussian | logistic (discretised) | laplace."""
    learn_sigma: bool = False
    """gaussian/laplace: learn one scale per pixel channel (else fixed ``sigma``)."""
    sigma: float = 0.1
    binarize: bool = False
    """Bernoulli targets: sample pixels ~ Bernoulli(intensity) each time (dynamic binarisation)."""
    beta: float = 1.0
    kl_warmup_steps: int = 0
    """Steps over which the KL weight rises linearly 0 → beta (0 = none)."""
    kl_schedule: str = "linear"
    """linear | cyclical (the linear ramp repeats ``kl_cycles`` times over ``trainer.max_steps``)."""
    kl_cycles: int = 4
    free_bits: float = 0.0
    """Minimum KL per latent dimension in nats (0 = off)."""
    iwae_k: int = 64
    """Importance samples for the IWAE NLL bound at validation/test."""
    logvar_clamp: float = 10.0
    """|log σ²| of the posterior (and of a conditional prior) is clamped to this."""
    prior: str = "standard"
    """standard (p(z) = N(0, I)) | conditional (a conditional VAE: p(z|c) = N(μ(c), σ(c)²) from the
    pooled condition, Sohn et al. 2015's prior network, starting at N(0, I)): the KL pulls each
    posterior toward its own condition's prior, so a draw for a caption lands where that
    caption's images are encoded rather than anywhere in N(0, I)."""
    prior_recon_weight: float = 0.0
    """A conditional VAE: also decode each target from a *prior* draw under its condition and add
    this weight × its negative log-likelihood to the loss (the hybrid objective of Sohn et al.
    2015, their GSNN term; 0 = off, the plain ELBO). The ELBO alone lets the posterior carry what
    the condition says in z, so a prior draw decodes to the average colour; this term is met only
    through the condition. One more decoder pass per step; logged as ``train/prior_recon``."""
    judge_steps: int = 0
    """A conditional image VAE: train the independent judge (xmodal/metrics/judge.py, the GAN's
    ``judge_acc``) for this many steps on the train split's labels, cached, and log
    ``judge_acc`` (samples decoded per condition read as its class) beside ``judge_real_acc``
    (real images; the ceiling). 0 = off."""
    judge_labels: dict[str, int] = field(default_factory=dict)
    """More attributes to judge, role → classes (``{colour: 6}``), as ``model.gan.judge_labels``:
    ``judge_<role>_acc`` / ``judge_<role>_real_acc`` (needs ``judge_steps`` > 0)."""
    cycle_captioner: str | None = None
    """A conditional VAE: path to a captioner checkpoint of the target's modality (image → text, or
    audio → text for a text → audio VAE; ``xmodal-train`` of the caption task on the same data and
    shape). Samples decoded per row are captioned (greedy) and scored against the row's captions:
    ``cycle_cider`` / ``cycle_bleu4`` (xmodal/metrics/cycle.py). None = off."""


@dataclass
class VaeModelConfig(ConditionConfig, OptimizerConfig, TaskConfig):
    """VAE / β-VAE / conditional VAE over the ``target`` role (an image, or a log-mel ``[1, M, T]``)."""

    task: str = "vae"
    target: str = "image"
    """image | audio (log-mel; gaussian or laplace likelihood): the 2-D nets only see ``[B, C, H, W]`` |
    video (clips ``[B, C, T, H, W]``: the 3-D conv nets of xmodal/nn/video.py)."""
    cond_dim: int = 64
    d_model: int = 64
    weight_decay: float = 0.0
    vae: VaeConfig = field(default_factory=VaeConfig)
    fusion: str = "concat"
    """How the built-in decoder, 2-D or 3-D (video), takes its condition (xmodal/nn/vae.py,
    xmodal/nn/video.py, xmodal/nn/fusion.py):
    ``concat`` (pooled vector concatenated to z; the CVAE as it was) | ``film`` (FiLM γ, β of the
    pooled vector after every upsampling block) | ``cross_attention`` (the 8×8 and 16×16 maps attend
    over the condition's tokens and padding mask). No ``cbn`` (the GAN's default): the decoder has
    no batch norm. The encoder q(z|x, c) concatenates the pooled vector whatever the choice."""
    encoder: Any = None
    """``_target_`` of any encoder called as ``encoder(x [B, C, H, W], cond [B, c] | None) -> (μ, log σ²)``
    each ``[B, z_dim]``; unset = the built-in conv encoder."""
    decoder: Any = None
    """``_target_`` of any decoder called as ``decoder(z, cond) -> (location, log_scale | None)``
    (``location`` ``[B, C, H, W]``), with an ``out`` conv; unset = the built-in conv decoder."""

    def roles(self) -> tuple[str, ...]:
        return condition_roles(self.target, self.condition)

    def judged(self) -> bool:
        """The judges train and score this run: the task judges conditional image VAEs only
        (``VaeTask``'s judge property)."""
        return self.vae.judge_steps > 0 and bool(self.conditions()) and self.target == "image"

    def optional_roles(self) -> tuple[str, ...]:
        return tuple(self.vae.judge_labels) if self.judged() else ()

    def problems(self, cfg: Any) -> list[str]:
        p = Problems(cfg)
        d, v = cfg.data, self.vae
        p.check(self.target in TARGETS, "model.target", "the vae task generates image, audio or video")
        condition_problems(p, self, self.target)
        if self.target == "image":
            p.check(
                d.image_size in (32, 64),
                "data.image_size",
                f"the {self.task} task's conv nets take 32 or 64 px",
            )
        p.one_of("model.vae.likelihood", VAE_LIKELIHOODS)
        p.check(v.beta >= 0, "model.vae.beta", "must be >= 0")
        p.check(v.iwae_k >= 1, "model.vae.iwae_k", "must be >= 1")
        p.check(
            v.kl_schedule in ("linear", "cyclical"), "model.vae.kl_schedule", "must be linear or cyclical"
        )
        p.check(v.kl_warmup_steps >= 0, "model.vae.kl_warmup_steps", "must be >= 0")
        p.check(v.free_bits >= 0, "model.vae.free_bits", "must be >= 0")
        p.check(v.sigma > 0, "model.vae.sigma", "must be > 0")
        p.check(v.z_dim >= 1 and v.width >= 1, "model.vae.z_dim", "z_dim and width must be >= 1")
        p.check(v.kl_cycles >= 1, "model.vae.kl_cycles", "must be >= 1")
        p.check(v.logvar_clamp > 0, "model.vae.logvar_clamp", "must be > 0")
        p.one_of("model.vae.prior", VAE_PRIORS)
        p.check(
            v.prior != "conditional" or bool(self.conditions()),
            "model.vae.prior",
            "a conditional prior needs a condition (model.condition is none)",
        )
        p.check(v.prior_recon_weight >= 0, "model.vae.prior_recon_weight", "must be >= 0 (0 = off)")
        p.check(
            v.prior_recon_weight == 0 or bool(self.conditions()),
            "model.vae.prior_recon_weight",
            "decodes prior draws under their condition: set model.condition",
        )
        p.check(v.judge_steps >= 0, "model.vae.judge_steps", "must be >= 0 (0 = off)")
        judge_label_problems(p, "model.vae.judge_labels", v.judge_labels)
        judge_monitor_problems(
            p,
            self.judged(),
            v.judge_labels,
            "model.vae.judge_steps > 0, a model.condition and an image target",
        )
        p.check(
            not v.binarize or v.likelihood == "bernoulli",
            "model.vae.binarize",
            "binarised targets need likelihood=bernoulli",
        )
        if self.target == "audio":
            for key in ("audio_mels", "audio_frames"):
                if d[key] not in (32, 64):
                    p.append(
                        f"data.{key}: an audio target's conv nets take 32 or 64 (mels and frames) (got {d[key]!r})"
                    )
            if v.likelihood not in ("gaussian", "laplace"):
                p.append(
                    "model.vae.likelihood: an audio target (real-valued log-mel) needs gaussian or laplace; "
                    f"bernoulli and logistic model pixel intensities (got {v.likelihood!r})"
                )
        if self.target == "video":
            p.check(
                d.video_size in (32, 64), "data.video_size", "a video target's 3-D conv nets take 32 or 64 px"
            )
            p.check(
                v.likelihood != "bernoulli",
                "model.vae.likelihood",
                "a video target takes gaussian, logistic or laplace (the 3-D decoder has no bernoulli)",
            )
        if v.cycle_captioner is not None:
            from xmodal.metrics.cycle import captioner_problems
            from xmodal.modalities.roles import modality_of
            from xmodal.registry import RegistryError

            key = "model.vae.cycle_captioner"
            p.check(
                bool(self.conditions()), key, "scores samples against their condition: set model.condition"
            )
            try:
                made = modality_of(self.target, dict(d.roles)).name
            except RegistryError:
                made = self.target
            p.extend(captioner_problems(key, v.cycle_captioner, made, d))
        if self.fusion == "cbn":
            p.check(False, "model.fusion", f"the vae decoder has no batch norm; must be one of {VAE_FUSIONS}")
        elif self.fusion not in VAE_FUSIONS:
            p.one_of("model.fusion", VAE_FUSIONS)
        elif self.fusion != "concat":
            p.check(bool(self.conditions()), "model.fusion", "fuses a condition; model.condition is none")
            p.check(
                self.decoder is None, "model.fusion", "applies to the built-in decoder; model.decoder is set"
            )
        check_slot(p, "model.encoder", self.encoder)
        check_slot(p, "model.decoder", self.decoder)
        optimizer_problems(p, self)
        return p
