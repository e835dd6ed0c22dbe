"""Variational autoencoder task: ELBO training, β and KL warm-up, free bits, conditional VAE,
importance-weighted NLL, per-dimension KL and active units.

Units: every loss term is a per-sample sum over data (or latent) dimensions, averaged over the
batch, in nats per example — the unit of the literature (Burda et al. 2015). ``*_bpd`` divides by
``C·H·W·ln 2``. The loss is computed in fp32 even under autocast.

Randomness is keyed, not drawn from the global RNG: training noise (reparameterisation ε and
dynamic binarisation) comes from a generator seeded by (``noise_seed``, step, rank), so a resumed
run draws exactly what an uninterrupted one would. Evaluation noise (the fixed binarisation and
the IWAE samples) is seeded per sample by its ``__key__``, so val/test numbers do not depend on
batch size, rank count or how often validation ran.

The target modality is ``model["target"]``: ``image`` (``[B, C, H, W]`` in [-1, 1]) or ``audio``
(log-mel ``[B, 1, M, T]``, in the model units of the audio modality: about [-1, 1]); the nets
see only ``[B, C, H, W]``, so text→image and text→audio are the same code. Audio frames past a
clip's end (``audio_mask`` False) are set to silence before the encoder and left out of every
log-likelihood sum, so padding costs nothing; ``*_bpd`` then divides by the real dimensions only.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchmetrics import MeanMetric

from xmodal.images import (
    SampleFile,
    SampleSet,
    animated_grids,
    caption_grid,
    file_slug,
    image_grid,
    spectrogram_images,
)
from xmodal.metrics.collapse import warn_if_collapsed
from xmodal.metrics.likelihood import (
    ActiveUnits,
    bernoulli_log_prob,
    discretized_logistic_log_prob,
    gaussian_kl_per_dim,
    gaussian_log_prob,
    iwae_log_likelihood,
    laplace_log_prob,
    log_normal_diag,
    log_standard_normal,
)
from xmodal.metrics.provenance import judge_family, judge_names
from xmodal.metrics.tones import ToneAccuracy
from xmodal.modalities.roles import modality_of
from xmodal.nn.condition import Encoded, build_condition_encoder, encode_condition
from xmodal.nn.fusion import pooled_view, repeat_condition
from xmodal.nn.slots import build_slot
from xmodal.nn.vae import ConditionalPrior, ConvDecoder, ConvEncoder
from xmodal.nn.video import VideoVaeDecoder, VideoVaeEncoder
from xmodal.tasks.adversarial import attribute_judge_nets, judge_classifier
from xmodal.tasks.base import XmodalTask, condition_names, to_device, trainable
from xmodal.tasks.generation import write_conditional_samples
from xmodal.tasks.schedule import with_warmup_cosine
from xmodal.tasks.vae.config import VaeModelConfig
from xmodal.tasks.vae.parallelize import parallelize_vae

SCALARS = ("nll", "neg_elbo", "recon", "kl", "nll_bpd", "neg_elbo_bpd")
EVAL_ROWS_PER_PASS = 1024
"""Decoder rows (samples × importance samples) per forward in IWAE evaluation (bounds memory)."""


def kl_weight(
    step: int, beta: float, warmup_steps: int, schedule: str = "linear", cycles: int = 4, total_steps: int = 0
) -> float:
    """Weight of the KL term at optimizer step ``step``.

    ``linear``: rises 0 → β over ``warmup_steps`` then stays at β (Bowman et al. 2016).
    ``cyclical``: ``total_steps`` is cut into ``cycles`` periods; in each the weight ramps 0 → β
    over ``warmup_steps`` (half the period when 0) and holds β for the rest (Fu et al. 2019).
    """
    if schedule == "cyclical" and total_steps > 0 and cycles > 0:
        period = max(total_steps // cycles, 1)
        ramp = warmup_steps if warmup_steps > 0 else max(period // 2, 1)
        return beta * min(1.0, (step % period) / min(ramp, period))
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / warmup_steps)


def key_seed(key: str) -> int:
    """A fixed seed per sample key (evaluation noise independent of batching and ranks)."""
    return zlib.crc32(key.encode()) ^ 0x5EED


def keyed_noise(
    keys: list[str], shape: tuple[int, ...], eps_shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key: a uniform ``shape`` tensor (fixed binarisation) and a normal ``eps_shape`` one
    (IWAE samples) from a generator seeded by the key → ``[B, *shape]``, ``[B, *eps_shape]``."""
    uniforms, normals = [], []
    for key in keys:
        g = torch.Generator().manual_seed(key_seed(key))
        uniforms.append(torch.rand(shape, generator=g))
        normals.append(torch.randn(eps_shape, generator=g))
    return torch.stack(uniforms), torch.stack(normals)


def log_likelihood(
    kind: str,
    location: torch.Tensor,
    log_scale: torch.Tensor | None,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """log p(targets | decoder output) per sample ``[B]`` for the configured likelihood, summed
    over the entries where ``mask`` (``[B, 1, 1, T]`` real audio frames; None = all) is True."""
    if kind == "bernoulli":
        assert mask is None, "masked targets (audio) take the gaussian or laplace likelihood"
        return bernoulli_log_prob(location, targets)
    assert log_scale is not None
    if kind == "gaussian":
        return gaussian_log_prob(location, log_scale, targets, mask)
    if kind == "laplace":
        return laplace_log_prob(location, log_scale, targets, mask)
    assert mask is None, "masked targets (audio) take the gaussian or laplace likelihood"
    return discretized_logistic_log_prob(location, log_scale, targets)


class VaeTask(XmodalTask):
    """VAE / β-VAE / conditional VAE over ``batch[model["target"]]`` (``[B, C, H, W]`` images or
    ``[B, 1, M, T]`` log-mels).

    ``model`` is the ``model`` config node as a plain dict (typed as :class:`VaeModelConfig`),
    ``tokenizer`` the tokenizer's state (text conditions), ``data`` the data shape; all saved as
    hyperparameters (``vocab``: what older checkpoints hold instead of ``tokenizer``), so
    ``VaeTask.load_from_checkpoint(path)`` rebuilds it (``model.encoder`` /
    ``model.decoder`` ``_target_`` nets included).
    """

    config_class = VaeModelConfig
    compiled_nets = ("encoder", "decoder")

    def __init__(
        self,
        model: dict[str, Any],
        tokenizer: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
        *,
        vocab: list[str] | None = None,
    ):
        super().__init__()
        self.save_task_hyperparameters(tokenizer, vocab, data)
        self.cfg = cfg = VaeModelConfig.from_node(model)
        self.vae = cfg.vae
        self.target = cfg.target
        self.likelihood = self.vae.likelihood
        self.shape = self.target_shape(self.target, data)  # (C, H, W)
        self.dims = math.prod(self.shape)
        self.condition = build_condition_encoder(
            cfg,
            len(self.tokenizer),
            self.tokenizer.pad_id,
            data["max_text_len"],
            data.get("audio_mels", 64),
            data.get("audio_frames", 64),
        )
        cond_dim = cfg.cond_dim if self.condition is not None else 0
        z_dim, width = self.vae.z_dim, self.vae.width
        # A clip's shape has a time axis: the 3-D conv nets take (C, T, H, W) as the 2-D ones (C, H, W).
        encoder_class, decoder_class = (
            (VideoVaeEncoder, VideoVaeDecoder) if len(self.shape) == 4 else (ConvEncoder, ConvDecoder)
        )
        # model.fusion reaches the built-in decoders, 2-D and 3-D (validation refuses it for a slot's).
        fused = {"fusion": cfg.fusion, "heads": cfg.heads}
        # cross_attention reads the condition's tokens: conditioning() then hands on Encoded views.
        self.condition_tokens = (
            self.condition is not None and cfg.fusion == "cross_attention" and cfg.decoder is None
        )
        self.encoder = build_slot(cfg.encoder, lambda: encoder_class(*self.shape, width, z_dim, cond_dim))
        self.decoder = build_slot(
            cfg.decoder,
            lambda: decoder_class(
                *self.shape,
                width,
                z_dim,
                cond_dim,
                likelihood=self.likelihood,
                learn_sigma=self.vae.learn_sigma,
                sigma=self.vae.sigma,
                **fused,
            ),
        )
        # model.vae.prior=conditional: p(z|c) from the pooled condition (none: N(0, I)).
        conditional_prior = self.vae.prior == "conditional" and self.condition is not None
        self.prior = ConditionalPrior(cond_dim, z_dim) if conditional_prior else None
        if self.target == "audio":
            # Most log-mel bins are silence (-1 in model units): starting the decoder there lets the
            # first steps learn the tones instead of walking the whole output down from 0.
            nn.init.constant_(self.decoder.out.bias, -1.0)
        # Drawn from the (seeded) global RNG once, then saved with the weights: training noise is
        # a function of (noise_seed, step, rank), so resuming reproduces it.
        self.register_buffer("noise_seed", torch.randint(0, 2**62, (), dtype=torch.int64))
        self.total_steps = 0
        # Split-level metrics synced as sums (exact for any rank count), logged as metric objects
        # so Lightning computes them in one fixed order on every rank.
        for stage in ("val", "test"):
            for name in SCALARS:
                setattr(self, f"{stage}_{name}", MeanMetric())
            setattr(self, f"{stage}_kl_dims", nn.ModuleList(MeanMetric() for _ in range(z_dim)))
            setattr(self, f"{stage}_active", ActiveUnits(z_dim))
        # Text → audio: whether clips decoded for each caption carry the tones it asks for (val,
        # test), and the real clips through the same vocoder (test): the bound the vocoder allows.
        roles = (data or {}).get("roles")
        self.tones = None
        if (
            self.target == "audio"
            and cfg.condition != "none"
            and modality_of(cfg.condition, roles).name == "text"
        ):
            self.tones = nn.ModuleDict({s: ToneAccuracy() for s in ("val", "test", "test_real")})
        # Conditional image VAE: whether samples decoded per condition read as its class to the
        # independent judge (the GAN's judge_acc), built in setup() from the data module.
        # Held in a plain dict, not as a submodule: the judge is no part of the model's state_dict.
        # Keyed by label role: "label" (judge_acc) and each of model.vae.judge_labels (colour).
        self._judge: dict[str, nn.Module] = {}
        judged = ("label", *self.vae.judge_labels)
        self.judge_acc = nn.ModuleDict(
            {f"{r}_{s}": MeanMetric() for r in judged for s in ("val", "test", "val_real", "test_real")}
        )
        # model.vae.cycle_captioner: CycleScore per stage (plain dict: the captioner is no submodule).
        self._cycle: dict[str, Any] = {}
        # Labelled rows judged in this pass (this rank), per label role and stage.
        self._judge_rows = {(r, s): 0 for r in judged for s in ("val", "test")}
        self._pending: set[str] = set()  # stages with generative scores still to log
        self.metric_provenance: dict[str, dict[str, Any]] = {}
        """What the judge and cycle scores were measured with, per stage (not saved)."""

    @staticmethod
    def target_shape(target: str, data: dict[str, int]) -> tuple[int, ...]:
        """``(C, H, W)`` of the generated modality: an image, or a log-mel ``[1, M, T]``; a clip's
        ``(C, T, H, W)``."""
        if target == "image":
            return (data["image_channels"], data["image_size"], data["image_size"])
        if target == "audio":
            return (1, data["audio_mels"], data["audio_frames"])
        if target == "video":
            return (data["image_channels"], data["video_frames"], data["video_size"], data["video_size"])
        raise ValueError(f"model.target: the vae task generates image, audio or video, got {target!r}")

    # ----------------------------------------------------------------- distributed / setup
    def parallelize(self, mesh: Any) -> None:
        parallelize_vae(self, mesh)

    def on_fit_start(self) -> None:
        max_steps = self.trainer.max_steps
        self.total_steps = max_steps if max_steps > 0 else int(self.trainer.estimated_stepping_batches)

    # ----------------------------------------------------------------- model pieces
    def target_data(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The generated modality in model units and the mask of what counts in its likelihood.

        Images: ``[B, C, H, W]`` in [-1, 1], no mask. Audio: log-mels in model units with padded
        frames set to silence (-1), so the encoder cannot read what padding holds, and the real-frame
        mask ``[B, 1, 1, T]`` that keeps it out of the log-likelihood.
        """
        data = batch[self.target]
        if self.target != "audio":
            return data, None
        mask = batch["audio_mask"].bool()[:, None, None, :]  # [B, 1, 1, T] True on real frames
        silence = torch.full((), -1.0, device=data.device)
        return torch.where(mask, data, silence), mask  # [B, 1, M, T] in model units, mask

    def real_dims(self, mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """Data dimensions each sample's likelihood sums over ``[B]`` (bits/dim divide by these)."""
        if mask is None:
            return torch.full((batch_size,), float(self.dims), device=self.device)
        per_frame = self.dims // self.shape[-1]  # C·M values per frame
        return mask.flatten(1).sum(1).float() * per_frame  # [B]

    def as_images(self, x: torch.Tensor) -> torch.Tensor:
        """Model-unit samples ``[B, C, H, W]`` → displayable images in [-1, 1] (audio: a
        spectrogram on the fixed model scale, low bands at the bottom)."""
        if self.target == "audio":
            return spectrogram_images(x, value_range=(-1.0, 1.0))
        return modality_of(self.target, self.hparams.data.get("roles")).show(x)  # a clip: its frames in a row

    @torch.no_grad()
    def animations(
        self, pairs: torch.Tensor, cond: torch.Tensor | Encoded | None, names: list[str]
    ) -> dict[str, list[Image.Image]]:
        """For a target with time (video): the reconstruction rows (``pairs``) and the samples of
        :meth:`validation_samples` as one grid per frame (GIFs); {} for stills."""
        modality = modality_of(self.target, self.hparams.data.get("roles"))
        recon = modality.animate(pairs)  # [2B, T, C, H, W] | None
        if recon is None:
            return {}
        drawn = modality.animate(self.sample(len(names), cond))  # the grid's draws (same seed)
        columns = min(8, len(names))
        tiles = lambda frames: image_grid(frames, columns=columns, scale=2)  # noqa: E731
        if cond is None:
            return {"reconstruction": animated_grids(recon, tiles), "prior": animated_grids(drawn, tiles)}
        captioned = animated_grids(drawn, lambda frames: caption_grid(frames, names))
        return {"reconstruction": animated_grids(recon, tiles), "conditional": captioned}

    def prepare(
        self, images: torch.Tensor, uniform: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Data in [-1, 1] → (likelihood targets, encoder input).

        Bernoulli targets are intensities in [0, 1], binarised when ``binarize`` by comparing with
        ``uniform`` (fresh each training step, fixed per sample in evaluation); the encoder then
        sees the binarised image. Other likelihoods model the [-1, 1] data directly.
        """
        if self.likelihood != "bernoulli":
            return images, images
        targets = (images.float() + 1) / 2
        if self.vae.binarize and uniform is not None:
            targets = (uniform < targets).float()
        return targets, targets * 2 - 1

    def encode(
        self, x: torch.Tensor, cond: torch.Tensor | Encoded | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x, pooled_view(cond))  # q(z|x, c) reads the pooled vector only
        clamp = self.vae.logvar_clamp
        return mu.float(), logvar.float().clamp(-clamp, clamp)  # [B, Z] each

    def prior_params(self, cond: torch.Tensor | Encoded | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The conditional prior's (mean, log variance) ``[B, Z]`` each; None for N(0, I)."""
        if self.prior is None or cond is None:
            return None
        mu, logvar = self.prior(pooled_view(cond))
        clamp = self.vae.logvar_clamp
        return mu.float(), logvar.float().clamp(-clamp, clamp)

    def prior_draw(self, eps: torch.Tensor, cond: torch.Tensor | Encoded | None) -> torch.Tensor:
        """Standard normal draws ``eps [B, Z]`` → draws of the prior (of each row's condition)."""
        params = self.prior_params(cond)
        if params is None:
            return eps
        mu, logvar = params
        return mu + torch.exp(0.5 * logvar) * eps.to(mu)  # [B, Z]

    def conditioning(self, batch: dict[str, Any]) -> torch.Tensor | Encoded | None:
        """The pooled condition ``[B, c]``, or with ``model.fusion=cross_attention`` its pooled and
        token views (:class:`Encoded`), which the encoder and decoder each read as they need."""
        if self.condition is None:
            return None
        if self.condition_tokens:
            return encode_condition(self.condition, batch)  # [B, c], [B, T, c], [B, T]
        return self.condition(batch)  # [B, c]

    def display(self, location: torch.Tensor) -> torch.Tensor:
        """Decoder output → the mean image in [-1, 1] (probabilities for Bernoulli)."""
        if self.likelihood == "bernoulli":
            return torch.sigmoid(location.float()) * 2 - 1
        return location.float().clamp(-1, 1)

    # ----------------------------------------------------------------- training
    def train_noise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Binarisation uniforms ``[B, C, H, W]``, ε ``[B, Z]`` and, under
        ``model.vae.prior_recon_weight``, a second ε ``[B, Z]`` for the prior draws (else None),
        keyed by (seed, step, rank). The second is drawn last, so the first two do not change."""
        seed = (int(self.noise_seed) * 1_000_003 + self.global_step * 1009 + self.global_rank) % 2**63
        g = torch.Generator(device=x.device).manual_seed(seed)
        uniform = torch.rand(x.shape, generator=g, device=x.device)
        eps = torch.randn((x.shape[0], self.vae.z_dim), generator=g, device=x.device)
        prior_eps = None
        if self.vae.prior_recon_weight > 0:
            prior_eps = torch.randn((x.shape[0], self.vae.z_dim), generator=g, device=x.device)
        return uniform, eps, prior_eps

    def elbo_terms(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One-sample ELBO pieces per sample: recon log-likelihood ``[B]``, KL per dim ``[B, Z]``;
        under ``model.vae.prior_recon_weight`` also ``prior_recon`` ``[B]``: the log-likelihood of
        each target decoded from a *prior* draw under its condition (Sohn et al. 2015's GSNN term)."""
        images, mask = self.target_data(batch)  # [B, C, H, W], [B, 1, 1, T] | None
        uniform, eps, prior_eps = self.train_noise(images)
        targets, x = self.prepare(images, uniform)
        cond = self.conditioning(batch)
        mu, logvar = self.encode(x, cond)
        z = mu + torch.exp(0.5 * logvar) * eps  # [B, Z]
        location, log_scale = self.decoder(z, cond)
        # The posterior can carry what the condition says (colour, kind) in z, and a prior draw
        # then decodes to the average of it: the prior draw's term is only met from the condition.
        prior_decoded = (
            self.decoder(self.prior_draw(prior_eps, cond), cond) if prior_eps is not None else None
        )
        with torch.autocast(device_type=images.device.type, enabled=False):
            terms = {
                "recon": log_likelihood(
                    self.likelihood, location.float(), _f32(log_scale), targets.float(), mask
                ),
                "kl_dims": gaussian_kl_per_dim(mu, logvar, self.prior_params(cond)),  # [B, Z]
            }
            if prior_decoded is not None:
                p_location, p_log_scale = prior_decoded
                terms["prior_recon"] = log_likelihood(
                    self.likelihood, p_location.float(), _f32(p_log_scale), targets.float(), mask
                )  # [B]
        return terms

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        terms = self.elbo_terms(batch)
        valid = batch["valid"].float()  # [B]
        n = valid.sum().clamp(min=1)
        recon = (terms["recon"] * valid).sum() / n
        kl_dims = (terms["kl_dims"] * valid[:, None]).sum(0) / n  # [Z] batch mean per dimension
        kl = kl_dims.sum()
        # Free bits (Kingma et al. 2016): each dimension's batch-mean KL counts at least λ nats.
        kl_term = kl_dims.clamp(min=self.vae.free_bits).sum() if self.vae.free_bits > 0 else kl
        weight = kl_weight(
            self.global_step,
            self.vae.beta,
            self.vae.kl_warmup_steps,
            self.vae.kl_schedule,
            self.vae.kl_cycles,
            self.total_steps,
        )
        loss = -recon + weight * kl_term
        scalars = {
            "train/neg_elbo": kl - recon,
            "train/recon": -recon,
            "train/kl": kl,
            "train/kl_weight": weight,
        }
        if "prior_recon" in terms:
            prior_recon = (terms["prior_recon"] * valid).sum() / n
            loss = loss - self.vae.prior_recon_weight * prior_recon
            scalars["train/prior_recon"] = -prior_recon
        scalars = {"train/loss": loss, **scalars}
        self.log_train_scalars(scalars, int(n), prog_bar=("train/loss",))
        return self.finite_or_skip(loss)

    # ----------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate_batch(self, batch: dict[str, Any], k: int | None = None) -> dict[str, torch.Tensor]:
        """Per sample: IWAE-k log-likelihood bound, one-sample recon, KL per dim, posterior mean.

        The fixed binarisation and the k samples come from the sample's key; the ELBO uses the
        first of the k samples, so IWAE-k ≥ ELBO holds per sample up to that one draw.
        """
        k = k or self.vae.iwae_k
        images, mask = self.target_data(batch)  # [B, C, H, W], [B, 1, 1, T] | None
        b = images.shape[0]
        z_dim = self.vae.z_dim
        uniform, eps = keyed_noise(batch["__key__"], tuple(images.shape[1:]), (k, z_dim))
        uniform, eps = uniform.to(images.device), eps.to(images.device)  # [B, C, H, W], [B, k, Z]
        targets, x = self.prepare(images, uniform)
        cond = self.conditioning(batch)
        mu, logvar = self.encode(x, cond)
        std = torch.exp(0.5 * logvar)
        prior = self.prior_params(cond)  # None: N(0, I)
        chunk = max(1, EVAL_ROWS_PER_PASS // max(b, 1))
        log_weights, recon_first = [], None
        for start in range(0, k, chunk):
            e = eps[:, start : start + chunk]  # [B, m, Z]
            m = e.shape[1]
            z = mu[:, None] + std[:, None] * e  # [B, m, Z]
            cond_m = repeat_condition(cond, m)  # [B·m, c] (and [B·m, T, c] tokens)
            location, log_scale = self.decoder(z.reshape(b * m, z_dim), cond_m)
            with torch.autocast(device_type=images.device.type, enabled=False):
                rep = targets.float().repeat_interleave(m, dim=0)  # [B·m, C, H, W]
                rep_mask = None if mask is None else mask.repeat_interleave(m, dim=0)  # [B·m, 1, 1, T]
                log_px = log_likelihood(
                    self.likelihood, location.float(), _f32(log_scale), rep, rep_mask
                ).view(b, m)
                log_pz = (
                    log_standard_normal(z)
                    if prior is None
                    else log_normal_diag(z, prior[0][:, None], prior[1][:, None])
                )  # [B, m]
                log_qz = log_normal_diag(z, mu[:, None], logvar[:, None])  # [B, m]
            if recon_first is None:
                recon_first = log_px[:, 0]
            log_weights.append(log_px + log_pz - log_qz)
        log_w = torch.cat(log_weights, dim=1).T  # [k, B]
        return {
            "log_likelihood": iwae_log_likelihood(log_w),  # [B]
            "recon": recon_first,  # [B]
            "kl_dims": gaussian_kl_per_dim(mu, logvar, prior),  # [B, Z]
            "mu": mu,  # [B, Z]
            "dims": self.real_dims(mask, b),  # [B] dimensions the likelihood counted
        }

    def _evaluate(self, batch: dict[str, Any], stage: str, batch_idx: int | None = None) -> None:
        valid = batch["valid"]  # [B] False on padding rows
        out = self.evaluate_batch(batch)
        kl_dims = out["kl_dims"][valid]  # [V, Z]
        kl, recon, nll = kl_dims.sum(1), -out["recon"][valid], -out["log_likelihood"][valid]
        bits = out["dims"][valid] * math.log(2.0)  # [V] real dimensions only (audio padding is free)
        values = {"nll": nll, "neg_elbo": recon + kl, "recon": recon, "kl": kl}
        values |= {"nll_bpd": nll / bits, "neg_elbo_bpd": (recon + kl) / bits}
        for name, value in values.items():
            metric = getattr(self, f"{stage}_{name}")
            metric.update(value)
            self.log(f"{stage}/{name}", metric, prog_bar=name == "nll")
        for i, metric in enumerate(getattr(self, f"{stage}_kl_dims")):
            metric.update(kl_dims[:, i])
            self.log(f"{stage}/kl_dim/{i:02d}", metric)
        active = getattr(self, f"{stage}_active")
        active.update(out["mu"][valid])
        self.log(f"{stage}/active_units", active)
        if self.tones is not None:
            self._evaluate_tones(batch, stage, valid, batch_idx)
        if self._judge or self._cycle:
            fake = self.conditional_samples(batch)  # one decode per row serves the judge and the cycle
            self._pending.add(stage)
            if self._judge:
                self._evaluate_judge(batch, stage, valid, fake)
            if stage in self._cycle:
                self._evaluate_cycle(batch, stage, valid, fake)
            if batch_idx is not None and self.is_last_eval_batch(batch_idx):
                self._finish_generative(stage)

    @torch.no_grad()
    def _evaluate_tones(
        self, batch: dict[str, Any], stage: str, valid: torch.Tensor, batch_idx: int | None
    ) -> None:
        """Decode a clip per caption from a prior draw keyed by the sample, vocode, find its tones;
        the accuracies are reduced and logged at the pass's last batch (on every rank alike)."""
        keep = valid.tolist()
        captions = [c for c, k in zip(condition_names(batch, self.cfg.condition), keep, strict=True) if k]
        real, mask = self.target_data(batch)  # [B, 1, M, T], [B, 1, 1, T]
        cond = self.conditioning(batch)
        z = self.prior_draw(keyed_prior(batch["__key__"], self.vae.z_dim).to(self.device), cond)  # [B, Z]
        generated = torch.where(mask, self.display(self.decoder(z, cond)[0]), real)  # padding: silence
        checks = [(stage, generated)] + ([("test_real", real)] if stage == "test" else [])
        for name, clips in checks:
            tones = self.tones[name]
            tones.update(clips[valid], mask[valid, 0, 0], captions)
            if batch_idx is None or not self.is_last_eval_batch(batch_idx):
                continue
            prefix = f"{stage}/tone_real" if name == "test_real" else f"{stage}/tone"
            for attribute, value in tones.results().items():
                self.log(f"{prefix}_{attribute}_acc", value, on_step=False, on_epoch=True)

    def setup(self, stage: str) -> None:
        """The cached judge for ``model.vae.judge_steps`` > 0 on a conditional image VAE; the cycle
        score's captioner (``model.vae.cycle_captioner``) on a conditional one."""
        if not self._cycle and self.condition is not None:
            from xmodal.metrics.cycle import build_cycle

            self._cycle = build_cycle(self.vae.cycle_captioner)
        if self._judge or self.vae.judge_steps <= 0 or self.target != "image" or self.condition is None:
            return
        judge = judge_classifier(self, self.target, self.cfg.num_classes, self.vae.judge_steps)
        if judge is not None:
            self._judge["label"] = judge.eval().requires_grad_(False)
        for role, net in attribute_judge_nets(
            self, self.target, self.vae.judge_labels, self.vae.judge_steps
        ).items():
            self._judge[role] = net.eval().requires_grad_(False)

    @torch.no_grad()
    def conditional_samples(self, batch: dict[str, Any]) -> torch.Tensor:
        """One decode per row from a prior draw keyed by the sample, under the row's condition
        ``[B, C, H, W]`` in model units (audio: padded frames are silence, as in the real clip)."""
        cond = self.conditioning(batch)
        z = self.prior_draw(keyed_prior(batch["__key__"], self.vae.z_dim).to(self.device), cond)  # [B, Z]
        fake = self.display(self.decoder(z, cond)[0]).float()
        real, mask = self.target_data(batch)
        return fake if mask is None else torch.where(mask, fake, real.float())

    @torch.no_grad()
    def _evaluate_judge(
        self, batch: dict[str, Any], stage: str, valid: torch.Tensor, fake: torch.Tensor
    ) -> None:
        """Each judge's class for each row's sample against the row's label of its role (rows
        without one are left out)."""
        real, _ = self.target_data(batch)
        for role, judge in self._judge.items():
            labels = batch.get(role)
            if labels is None:
                labels = torch.full_like(valid, -1, dtype=torch.long)
            known = valid & (labels >= 0)  # [B]
            self._judge_rows[role, stage] += int(known.sum())
            judge = judge.to(self.device)
            # Updated on every rank, even with no rows, so every rank takes part in the reduction.
            for name, images, key in zip(
                (stage, f"{stage}_real"), (fake, real.float()), judge_names(role), strict=True
            ):
                hits = judge(images[known]).argmax(1) == labels[known]  # [K]
                self.judge_acc[f"{role}_{name}"].update(hits.float())
                self.log(f"{stage}/{key}", self.judge_acc[f"{role}_{name}"], on_step=False, on_epoch=True)

    def _evaluate_cycle(
        self, batch: dict[str, Any], stage: str, valid: torch.Tensor, fake: torch.Tensor
    ) -> None:
        """Each valid row's sample captioned, kept with the row's captions for the split's score."""
        keep = valid.tolist()
        captions = batch.get("captions") or [[] for _ in keep]
        mask = batch.get(f"{self.target}_mask")
        self._cycle[stage].update(
            fake[valid],
            [k for k, v in zip(batch["__key__"], keep, strict=True) if v],
            [list(c) for c, v in zip(captions, keep, strict=True) if v],
            mask[valid] if mask is not None else None,
        )

    def _finish_generative(self, stage: str) -> None:
        """At the pass's end, on every rank: the cycle score (gathered rows), and the provenance of
        the judge and cycle scores with their rows counted over all ranks."""
        from xmodal.metrics.cycle import log_cycle
        from xmodal.metrics.provenance import record_provenance, scorer_record, task_data

        self._pending.discard(stage)
        if stage in self._cycle:
            log_cycle(self, stage, self._cycle[stage])
        for role, judge in self._judge.items():
            rows = torch.tensor(float(self._judge_rows[role, stage]), device=self.device)
            if self._trainer is not None:
                rows = self.trainer.strategy.reduce(rows, reduce_op="sum")
            self._judge_rows[role, stage] = 0
            n = int(round(float(rows)))
            record = scorer_record(judge, list(judge_names(role)), stage, n, n, *task_data(self))
            record_provenance(self, stage, {judge_family(role): record})

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val", batch_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test", batch_idx)

    def _check_collapse(self, stage: str) -> None:
        # On every rank: compute() is a collective; torchmetrics caches it for Lightning's own log.
        active = getattr(self, f"{stage}_active")
        if active.update_called:
            warn_if_collapsed(self, stage, {"active_units": float(active.compute())})

    def on_validation_epoch_end(self) -> None:
        self._check_collapse("val")
        if "val" in self._pending:  # a loader of unknown length: no last batch was seen
            self._finish_generative("val")

    def on_test_epoch_end(self) -> None:
        self._check_collapse("test")
        if "test" in self._pending:
            self._finish_generative("test")

    # ----------------------------------------------------------------- samples
    @torch.no_grad()
    def sample(self, n: int, cond: torch.Tensor | Encoded | None = None, seed: int = 0) -> torch.Tensor:
        """Means ``[n, C, H, W]`` in [-1, 1] (model units) decoded from prior draws (a fixed bank by
        seed); :meth:`as_images` makes them displayable."""
        eps = torch.randn((n, self.vae.z_dim), generator=torch.Generator().manual_seed(seed)).to(self.device)
        location, _ = self.decoder(self.prior_draw(eps, cond), cond)
        return self.display(location)

    @torch.no_grad()
    def validation_samples(self, batch: dict[str, Any]) -> SampleSet:
        """Reconstructions (inputs row above, posterior-mean decodes below), prior samples, and for
        a conditional model samples for the batch's captions/labels (the batch is a fixed set of
        validation samples). Audio targets are shown as spectrograms on the fixed model scale."""
        batch = to_device(batch, self.device)
        images, mask = self.target_data(batch)  # [B, C, H, W], [B, 1, 1, T] | None
        n = images.shape[0]
        uniform, _ = keyed_noise(batch["__key__"], tuple(images.shape[1:]), (1, 1))
        targets, x = self.prepare(images, uniform.to(self.device))
        cond = self.conditioning(batch)
        mu, _ = self.encode(x, cond)
        recon = self.display(self.decoder(mu, cond)[0])  # [B, C, H, W]
        if mask is not None:  # padded frames are not modelled: show them as the silence they hold
            recon = torch.where(mask, recon, x.float())
        columns = min(8, n)
        rows = []
        for start in range(0, n, columns):
            rows += [x[start : start + columns].float(), recon[start : start + columns]]
        grids = {"reconstruction": image_grid(self.as_images(torch.cat(rows)), columns=columns, scale=2)}
        names = condition_names(batch, self.cfg.condition)
        if cond is None:
            grids["prior"] = image_grid(self.as_images(self.sample(n)), columns=columns, scale=2)
        else:
            samples = self.sample(n, cond)  # [B, C, H, W] model units
            grids["conditional"] = caption_grid(self.as_images(samples), names)
        table = [[key, name] for key, name in zip(batch["__key__"], names, strict=True)]
        files = {} if cond is None else self.sample_files(samples, mask, names)
        animations = self.animations(torch.cat(rows), cond, names)
        return SampleSet(grids, ["key", "condition"], table, animations=animations, files=files)

    def sample_files(
        self, samples: torch.Tensor, mask: torch.Tensor | None, names: list[str]
    ) -> dict[str, list[SampleFile]]:
        """The target modality's files of conditional samples (WAVs of log-mels, cut to the real
        frames of the batch's clips; an image target has none), named by row and caption."""
        if mask is not None:
            samples = torch.where(mask, samples, torch.full((), -1.0, device=samples.device))
        target = modality_of(self.target, self.hparams.data.get("roles"))
        made = target.output_files(samples.float().cpu(), None if mask is None else mask[:, 0, 0].cpu())
        if not made:  # a modality without files of its own (images, clips)
            return {}
        entries = [
            SampleFile(f"{i:02d}_{file_slug(name)}.{ext}", name, data)
            for i, (name, (ext, data)) in enumerate(zip(names, made, strict=True))
        ]
        return {self.target: entries} if entries else {}

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(trainable(self), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        return with_warmup_cosine(
            optimizer, int(self.trainer.estimated_stepping_batches), self.cfg.warmup_steps
        )

    # ----------------------------------------------------------------- xmodal-generate
    def generate_outputs(self, inputs: dict[str, list[Any]], args: Any) -> list[dict[str, str]]:
        """``args.num`` seeded samples per condition as PNGs plus ``grid.png`` in ``args.out`` (an
        audio target's log-mels as spectrograms on the fixed model scale, and as WAVs; a video
        target's clips as frame strips, and as looping GIFs)."""

        def sample(batch: dict[str, Any], n: int) -> torch.Tensor:
            return self.sample(n, self.conditioning(batch), seed=args.seed)

        target = modality_of(self.target, self.hparams.data.get("roles"))
        return write_conditional_samples(self, self.cfg, inputs, args, sample, self.as_images, target)


def keyed_prior(keys: list[str], z_dim: int) -> torch.Tensor:
    """A prior draw ``[B, z_dim]`` per sample key (not the IWAE draws': another seed of the key)."""
    return torch.stack(
        [torch.randn(z_dim, generator=torch.Generator().manual_seed(key_seed(k) ^ 0x70E5)) for k in keys]
    )


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()
