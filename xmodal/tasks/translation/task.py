"""Image → image translation (pix2pix-style) under Lightning's manual optimization.

One training batch is one *iteration*: G translates the source once; D takes a step on
(source, target) against (source, detached translation); then G takes a step on the adversarial
term through the updated D plus ``l1_weight`` × L1 to the target. ``model.loss=none`` drops D
(an L1-only baseline through the same code). Steps are guarded as for the GAN
(xmodal/tasks/adversarial.py): fp32 losses from logits, unscaled norms, non-finite steps skipped
and counted. G is deterministic (no noise, no dropout), so evaluation and ``xmodal-generate``
need no seeds and score the same images on any rank count.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from xmodal.images import SampleSet, image_grid
from xmodal.metrics.translation import TranslationMetrics
from xmodal.modalities.roles import modality_of
from xmodal.nn.patchgan import PatchDiscriminator
from xmodal.nn.slots import build_slot
from xmodal.nn.unet import UNetGenerator
from xmodal.tasks.adversarial import (
    GuardedSteps,
    d_loss_terms,
    feature_classifier,
    g_loss_terms,
    log_split_metrics,
    weighted_mean,
)
from xmodal.tasks.base import GenerateError, XmodalTask, condition_names, to_device
from xmodal.tasks.generation import flag_of, only_inputs, role_inputs, write_images
from xmodal.tasks.translation.config import TranslationConfig
from xmodal.tasks.translation.parallelize import parallelize_translation


def per_row(values: torch.Tensor) -> torch.Tensor:
    """Mean over everything but the batch dimension: ``[B, ...] -> [B]`` (patch logits, pixels)."""
    return values.flatten(1).mean(1)


class TranslationTask(GuardedSteps, XmodalTask):
    """Translate ``batch[model.source]`` into ``batch[model.target]`` (two image roles of a sample).

    ``model``, ``vocab`` and ``data`` as for every task (plain dicts, saved as hyperparameters;
    ``model`` typed as :class:`TranslationConfig`). ``model.generator`` / ``model.discriminator``
    ``_target_`` slots swap the nets for any ``G(source) -> image`` and ``D(source, image) ->
    logits [B, ...]``; ``nets=(G, D)`` does the same from Python (not saved).
    """

    config_class = TranslationConfig
    compiled_nets = ("generator", "discriminator")
    checkpoint_prefix = "translation"
    # D's backward never reaches G's parameters, and G's step leaves D's (toggled off); with
    # model.loss=none D gets no gradient at all. DDP must be told, or it waits for them.
    find_unused_parameters = True
    clips_own_gradients = True

    def __init__(
        self,
        model: dict[str, Any],
        tokenizer: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
        nets: tuple[nn.Module, nn.Module] | None = None,
        *,
        vocab: list[str] | None = None,
    ):
        super().__init__()
        self.save_task_hyperparameters(
            tokenizer, vocab, data, ignore=("nets",)
        )  # xmodal-generate collates with its tokenizer
        self.automatic_optimization = False
        self.cfg = cfg = TranslationConfig.from_node(model)
        self.source, self.target = cfg.source, cfg.target
        if nets is None:
            channels = data["image_channels"]
            nets = (
                build_slot(
                    cfg.generator,
                    lambda: UNetGenerator(channels, channels, cfg.g_width, cfg.g_depth, cfg.g_residual),
                ),
                build_slot(
                    cfg.discriminator, lambda: PatchDiscriminator(channels, cfg.d_width, cfg.d_layers)
                ),
            )
        self.generator, self.discriminator = nets
        self.iteration = 0
        """Training batches done (a D step + a G step each, a G step without D); saved in checkpoints."""
        self.skipped_steps = 0
        """Optimizer steps skipped because their gradients were not finite."""
        self.max_grad_norm = cfg.clip_grad_norm
        # Kept out of the module tree (a plain dict): no checkpoint, DDP or FSDP2 ever sees them.
        self._metrics = {stage: TranslationMetrics() for stage in ("val", "test")}

    def setup(self, stage: str) -> None:
        """Add FID/KID on the targets once the data is known (the cached classifier, trained on
        the target role's train images on a miss)."""
        if not self.cfg.fid or self._metrics["val"].generative is not None:
            return
        classifier = feature_classifier(self, self.target, self.cfg.num_classes, self.cfg.feature_steps)
        if classifier is None:
            return  # a plain DataLoader (tests): L1, PSNR and SSIM only
        import copy

        from xmodal.metrics.fid import GenerativeMetrics

        for metrics in self._metrics.values():
            metrics.generative = GenerativeMetrics(copy.deepcopy(classifier))

    def parallelize(self, mesh: Any) -> None:
        parallelize_translation(self, mesh)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        cfg = self.cfg
        g_opt = torch.optim.Adam(self.generator.parameters(), lr=cfg.g_lr, betas=tuple(cfg.g_betas))
        d_opt = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.d_lr, betas=tuple(cfg.d_betas))
        return [g_opt, d_opt]

    # ----------------------------------------------------------------------------- training

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        g_opt, d_opt = self.optimizers()
        cfg = self.cfg
        source, target = batch[self.source], batch[self.target]  # [B, C, H, W] each, in [-1, 1]
        n = source.shape[0]
        valid = batch.get("valid")
        weights = valid.float() if valid is not None else torch.ones(n, device=source.device)  # [B]
        fake = self.generator(source)  # [B, C, H, W]
        logged: dict[str, torch.Tensor] = {}
        if cfg.adversarial:
            with self.only(d_opt):
                d_real = self.discriminator(source, target).float()  # [B, 1, h, w] logits, fp32
                d_fake = self.discriminator(source, fake.detach()).float()
                d_loss = weighted_mean(per_row(d_loss_terms(cfg.loss, d_real, d_fake)), weights)
                logged["train/d_grad_norm"] = self.optimizer_step(d_opt, d_loss)
            logged["train/d_loss"] = d_loss.detach()
            logged["train/d_real"] = weighted_mean(per_row(d_real.detach()), weights)
            logged["train/d_fake"] = weighted_mean(per_row(d_fake.detach()), weights)
        with self.only(g_opt):
            l1 = weighted_mean(per_row((fake.float() - target.float()).abs()), weights)
            g_loss = cfg.l1_weight * l1
            if cfg.adversarial:
                g_adv = weighted_mean(
                    per_row(g_loss_terms(cfg.loss, self.discriminator(source, fake).float())), weights
                )
                g_loss = g_loss + g_adv
                logged["train/g_adv"] = g_adv.detach()
            logged["train/g_grad_norm"] = self.optimizer_step(g_opt, g_loss)
        self.iteration += 1
        logged.update({"train/g_loss": g_loss.detach(), "train/l1": l1.detach()})
        self.log_train_scalars({**logged, "train/skipped_steps": float(self.skipped_steps)}, n)

    # ----------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def translate(self, source: torch.Tensor) -> torch.Tensor:
        """Translations ``[B, C, H, W]`` in [-1, 1] of sources ``[B, C, H, W]`` in [-1, 1]."""
        return self.generator(source.to(self.device))

    def _evaluate(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        # Every rank translates every batch (under FSDP2 a forward is a collective).
        fake = self.translate(batch[self.source])  # [B, C, H, W]
        valid = batch["valid"]  # [B] False on padding rows
        metrics = self._metrics[stage].to(self.device)
        metrics.update(fake[valid], batch[self.target][valid])
        if self.is_last_eval_batch(batch_idx):
            log_split_metrics(self, stage, metrics, prog_bar="ssim")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def validation_samples(self, batch: dict[str, Any]) -> SampleSet:
        """One row per sample: source | translation | target; the table names each row's scene."""
        batch = to_device(batch, self.device)
        source, target = batch[self.source], batch[self.target]
        fake = self.translate(source)
        rows = torch.stack([source.float(), fake.float(), target.float()], dim=1)  # [N, 3, C, H, W]
        grid = image_grid(rows.flatten(0, 1).cpu(), columns=3, scale=2)
        names = condition_names(batch, "text")
        table = [[key, name] for key, name in zip(batch["__key__"], names, strict=True)]
        return SampleSet({"translation": grid}, ["key", "caption"], table)

    # ----------------------------------------------------------------------------- xmodal-generate
    def generate_outputs(self, inputs: dict[str, list[Any]], args: Any) -> list[dict[str, str]]:
        """The translation of each ``--image`` file (resized to the model's size first) as
        ``sample_NNNN.png`` in input order, plus ``grid.png``; G has no noise, so ``--num`` and
        ``--seed`` do not apply."""
        modality = modality_of(self.source, self.hparams.data.get("roles"))
        only_inputs(args.ckpt, inputs, modality.name, f"a {modality.name} → {modality.name} translator")
        values = inputs.get(modality.name)
        if not values:
            raise GenerateError(f"{args.ckpt} translates images: give {flag_of(modality)} FILE …")
        batch = to_device(role_inputs(self, self.source, values), self.device)
        images = self.translate(batch[self.source]).float().cpu()  # [N, C, H, W]
        paths = write_images(images, [""] * len(values), args.out)
        return [
            {modality.name: str(value), "translation": str(path)}
            for value, path in zip(values, paths, strict=True)
        ]
