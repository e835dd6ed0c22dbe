"""Adversarial task: a (conditional) GAN under Lightning's manual optimization.

One training batch is one *iteration*: ``n_critic`` D steps on detached fakes, then one G step,
each ``zero_grad → manual_backward → clip → step`` inside ``toggled_optimizer`` before the next
optimizer is touched (one GradScaler update per step, never two backwards in flight). Lightning's
``global_step`` counts every optimizer step, so the task keeps its own ``iteration`` counter (saved
in checkpoints) and the factory turns ``trainer.max_steps`` (iterations) into Lightning's count.

Pitfalls handled in xmodal/tasks/adversarial.py (shared with image → image translation): losses
from logits in fp32, unscaled gradient norms and clipping under 16-mixed, non-finite steps skipped.
Here: an EMA generator of our own for samples and metrics; noise drawn from a generator seeded by
(seed, rank, iteration), so a resumed run draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import copy
import logging
import zlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from xmodal.images import SampleSet, caption_grid, image_grid
from xmodal.nn.diffaugment import diff_augment
from xmodal.nn.ema import ema_decay, update_ema
from xmodal.nn.gan import aux_slices, build_gan_nets
from xmodal.tasks.adversarial import (
    GuardedSteps,
    attribute_judge_nets,
    class_loss,
    d_loss_terms,
    fake_term,
    feature_classifier,
    g_loss_terms,
    judge_classifier,
    log_split_metrics,
    rolled_conditions,
    shard_datamodule,
    weighted_mean,
)
from xmodal.tasks.base import XmodalTask, condition_names, to_device, trainable
from xmodal.tasks.gan.config import GanModelConfig
from xmodal.tasks.gan.parallelize import parallelize_gan
from xmodal.tasks.generation import write_conditional_samples

log = logging.getLogger("xmodal")

SAMPLE_SEED = 1234
"""Seed of the fixed noise bank behind every validation sample grid."""


def row_noise(keys: list[str], z_dim: int, salt: int = 0) -> torch.Tensor:
    """One noise vector per sample key ``[B, Z]``: the same for a key whatever its rank or batch, so
    metrics on 2 ranks score the very images 1 rank would."""
    rows = [
        torch.randn(z_dim, generator=torch.Generator().manual_seed(zlib.crc32(f"{salt}:{k}".encode())))
        for k in keys
    ]
    return torch.stack(rows)


class AdversarialTask(GuardedSteps, XmodalTask):
    """GAN over ``batch[model.target]`` (images), conditioned on ``model.condition`` (none, label,
    text, audio).

    ``model``, ``tokenizer`` (its state) and ``data`` as for every task (plain dicts, saved as
    hyperparameters; ``model`` is typed as :class:`GanModelConfig`; ``vocab``: what older
    checkpoints hold instead of ``tokenizer``). ``model.generator`` / ``model.discriminator``
    ``_target_`` slots swap the DCGAN nets for any pair called as ``G(z, batch)`` and
    ``D(x, batch) -> logits [B]`` (saved, so checkpoints rebuild them); ``nets=(G, D)`` does the
    same from Python (not saved: pass them again to ``load_from_checkpoint``).
    """

    config_class = GanModelConfig
    checkpoint_prefix = "gan"  # checkpoints keep gan_iteration / gan_skipped_steps
    find_unused_parameters = True  # D's backward never reaches G's parameters, and the reverse
    clips_own_gradients = True
    # trainer.compile: two graphs (the EMA copy is never trained, so never compiled).
    compiled_nets = ("generator", "discriminator")

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
        self.save_task_hyperparameters(tokenizer, vocab, data, ignore=("nets",))
        self.automatic_optimization = False
        self.cfg = GanModelConfig.from_node(model)
        self.gan = self.cfg.gan
        self.target = self.cfg.target
        self.conditional = bool(self.cfg.conditions())
        if nets is None:
            nets = build_gan_nets(self.cfg, len(self.tokenizer), self.tokenizer.pad_id, data)
        self.generator, self.discriminator = nets
        d = self.discriminator
        if self.gan.aux_weight > 0 and not (getattr(d, "has_classes", False) or getattr(d, "classes", None)):
            raise ValueError(
                "model.gan.aux_weight > 0 needs a discriminator with a class head (the built-in one, "
                "or one with score(images, batch) -> (logits, class_logits) and a `classes` layer)"
            )
        self.ema: nn.Module | None = None
        if self.gan.ema_decay > 0:
            self.ema = copy.deepcopy(self.generator).requires_grad_(False)
        self._warned_no_labels = False
        self.aux_slices = aux_slices(self.cfg)  # (role, first, end) of the AC-GAN head's logits
        self.iteration = 0
        """Training batches done (n_critic D steps + 1 G step each); saved in checkpoints."""
        self.skipped_steps = 0
        """Optimizer steps skipped because their gradients were not finite."""
        self.max_grad_norm = self.gan.clip_grad_norm
        # Kept out of the module tree (a plain dict): no checkpoint, DDP or FSDP2 ever sees them.
        self._metrics: dict[str, Any] = {}
        self._cycle: dict[str, Any] = {}  # model.gan.cycle_captioner: CycleScore per stage
        self.metric_provenance: dict[str, dict[str, Any]] = {}
        """What this task's FID/KID, judge and cycle scores were measured with, per stage (not saved)."""
        self._scored = 0  # valid rows scored so far in this evaluation pass (this rank)

    # ----------------------------------------------------------------------------- setup

    def setup(self, stage: str) -> None:
        """Build the offline FID/KID/accuracy metrics from the datamodule's data (cached classifier),
        and the cycle score's captioner (``model.gan.cycle_captioner``)."""
        if not self._cycle and self.conditional:
            from xmodal.metrics.cycle import build_cycle

            self._cycle = build_cycle(self.gan.cycle_captioner)
        if self._metrics:
            return
        classifier = feature_classifier(self, self.target, self.cfg.num_classes, self.gan.feature_steps)
        if classifier is None:
            return  # e.g. a plain DataLoader in tests: no image metrics
        from xmodal.metrics.fid import GenerativeMetrics, InceptionFeatures

        weights = self.gan.inception_weights
        features = InceptionFeatures(weights) if weights else None
        # Only a conditional G is asked for classes: an unconditional one has nothing to judge.
        judge_steps = self.gan.judge_steps if self.conditional else 0
        judge = judge_classifier(self, self.target, self.cfg.num_classes, judge_steps)
        attribute_judges = attribute_judge_nets(self, self.target, self.gan.judge_labels, judge_steps)
        for stage_name in ("val", "test"):
            self._metrics[stage_name] = GenerativeMetrics(
                copy.deepcopy(classifier),
                copy.deepcopy(features) if features is not None else None,
                conditional=self.conditional,
                kid_subset_size=min(100, self.gan.metric_samples),
                judge=copy.deepcopy(judge) if judge is not None else None,
                attribute_judges=copy.deepcopy(attribute_judges),
            )

    def parallelize(self, mesh: Any) -> None:
        parallelize_gan(self, mesh)

    def on_fit_start(self) -> None:
        """``model.gan.aux_warmup_steps``: D's class head (the separate one, or the shared head
        with the features under it) learns the real images' classes, the label and each of
        ``model.gan.aux_labels``, before G first asks it (a fresh run only; the same steps on
        every rank, so DDP replicas stay identical)."""
        d = self.discriminator
        datamodule = shard_datamodule(self)
        warms = self.gan.aux_warmup_steps > 0 and self.gan.aux_weight > 0
        if not warms or not hasattr(d, "class_logits") or self.iteration > 0 or datamodule is None:
            return
        from xmodal.metrics.features import load_split_labels

        # debug=fdr is a smoke test of seconds: two steps run the code, not the 30 s of training.
        steps = min(self.gan.aux_warmup_steps, 2) if self.trainer.fast_dev_run else self.gan.aux_warmup_steps

        images, targets = load_split_labels(
            datamodule.data,
            "train",
            datamodule.decode,
            ("label", *self.gan.aux_labels),
            allow_pipe=datamodule.allow_pipe,
            role=self.target,
        )
        loss = warm_start_class_head(
            d.class_logits,
            d.class_parameters(),
            images.to(self.device),
            {role: t.to(self.device) for role, t in targets.items()},
            self.class_losses,
            steps,
            self.gan.aux_lr,
            self.run_seed,
        )
        log.info(
            "class head warmed on %d real images for %d steps (%s): loss %.3f",
            len(images),
            steps,
            ", ".join(targets),
            loss,
        )

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        g, gan = self.generator, self.gan
        g_opt = torch.optim.Adam(trainable(g), lr=gan.g_lr, betas=tuple(gan.g_betas))
        head = getattr(self.discriminator, "classifier", None)
        head_ids = {id(p) for p in head.parameters()} if head is not None else set()
        groups: list[dict[str, Any]] = [
            {"params": [p for p in trainable(self.discriminator) if id(p) not in head_ids]}
        ]
        if head is not None:  # a classifier's recipe, not the adversarial one (model.gan.aux_head)
            groups.append({"params": trainable(head), "lr": gan.aux_lr, "betas": (0.9, 0.999)})
        d_opt = torch.optim.Adam(groups, lr=gan.d_lr, betas=tuple(gan.d_betas))
        return [g_opt, d_opt]

    # ----------------------------------------------------------------------------- training

    def step_seed(self, salt: int) -> int:
        """A seed from (seed, rank, iteration, salt): no RNG state to save, a resume draws alike."""
        return (((self.run_seed * 1009 + self.global_rank) * 1_000_003 + self.iteration) * 31 + salt) % (
            2**63
        )

    def noise(self, n: int, salt: int) -> torch.Tensor:
        """``[n, Z]`` drawn from a generator seeded by :meth:`step_seed`."""
        gen = torch.Generator(device=self.device).manual_seed(self.step_seed(salt))
        return torch.randn(n, self.gan.z_dim, generator=gen, device=self.device)

    def augment(self, images: torch.Tensor, salt: int) -> torch.Tensor:
        """What D sees of ``images``: DiffAugment's ops (``model.gan.diffaugment``), seeded per step."""
        if not self.gan.diffaugment:
            return images
        return diff_augment(images, self.gan.diffaugment, torch.Generator().manual_seed(self.step_seed(salt)))

    def penalty_grad(self, outputs: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """d(sum outputs)/d inputs with a graph, computed on scaled outputs under 16-mixed (fp16
        double-backward underflows otherwise) and unscaled after."""
        scale = self.loss_scale()
        (grad,) = torch.autograd.grad(outputs.float().sum() * scale, inputs, create_graph=True)
        return grad.float() / scale

    def d_loss(
        self,
        real: torch.Tensor,
        fake: torch.Tensor,
        batch: dict[str, Any],
        weights: torch.Tensor,
        d_step: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        gan = self.gan
        r1 = gan.r1_weight > 0 and d_step % gan.r1_every == 0
        real_in = real.detach().requires_grad_(True) if r1 else real
        salt = 20_000 + 4 * d_step  # augmentations of this D step: real, fake, mismatched
        # [B] logits fp32; [B, K] class logits with the AC-GAN head, else None
        d_real, real_classes = self.score(self.augment(real_in, salt), batch)
        fake_in = self.augment(fake, salt + 1)
        if real_classes is not None and gan.aux_mode == "adc":
            d_fake, fake_classes = self.score(fake_in, batch)  # [B], [B, 2K]
        else:
            d_fake, fake_classes = self.discriminator(fake_in, batch).float(), None  # [B]
        loss = weighted_mean(d_loss_terms(gan.loss, d_real, d_fake), weights)
        stats = {
            "d_real": weighted_mean(d_real.detach(), weights),
            "d_fake": weighted_mean(d_fake.detach(), weights),
        }
        if real_classes is not None:
            # AC-GAN, real rows only: D classifying fakes as their row's class would teach it G's
            # mistakes as classes. ADC-GAN classifies them too, as a class of their own (fake k).
            aux = self.class_losses(real_classes, batch, weights)
            stats["d_aux"] = aux.detach()
            if fake_classes is not None:
                aux_fake = self.class_losses(fake_classes, batch, weights, fake=True)
                stats["d_aux_fake"] = aux_fake.detach()
                aux = aux + aux_fake
            loss = loss + gan.aux_weight * aux
        if gan.mismatch_weight > 0:
            mismatched = rolled_conditions(batch, self.target)
            d_mismatch = self.discriminator(self.augment(real, salt + 2), mismatched).float()  # [B]
            mismatch = weighted_mean(fake_term(gan.loss, d_mismatch), weights)
            loss = loss + gan.mismatch_weight * mismatch
            stats["d_mismatch"] = mismatch.detach()
        if gan.loss == "wgan-gp":
            alpha = self.noise(real.shape[0], salt=10_000 + d_step)[:, :1]  # [B, 1]
            alpha = torch.sigmoid(alpha).view(-1, *([1] * (real.dim() - 1)))  # [B, 1, ...] in (0, 1)
            mixed = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
            grad = self.penalty_grad(self.discriminator(mixed, batch), mixed)
            gp = weighted_mean((grad.flatten(1).norm(dim=1) - 1) ** 2, weights)
            loss = loss + gan.gp_weight * gp
            stats["gp"] = gp.detach()
        if r1:
            grad = self.penalty_grad(d_real, real_in)
            penalty = weighted_mean(grad.flatten(1).pow(2).sum(1), weights)
            # Lazy: every r1_every steps, weighted up by r1_every (same expected penalty).
            loss = loss + 0.5 * gan.r1_weight * gan.r1_every * penalty
            stats["r1"] = penalty.detach()
        return loss, stats

    def class_losses(
        self, logits: torch.Tensor, batch: dict[str, Any], weights: torch.Tensor, fake: bool = False
    ) -> torch.Tensor:
        """The AC-GAN head's cross-entropy: of the class label, plus one per attribute of
        ``model.gan.aux_labels`` on its own slice of the logits ``[B, K + ...]``. ``fake``: D's
        targets for G's samples under ``aux_mode=adc`` (class k of a row → fake logit K + k)."""
        total = logits.new_zeros(())
        adc = self.gan.aux_mode == "adc"
        if len(self.aux_slices) == 1 and not adc:  # the label alone: every logit a D gives
            return class_loss(logits, self.labels(batch), weights)
        if self.aux_slices[-1][2] > logits.shape[1]:  # a D of the user's with fewer class logits
            raise ValueError(
                f"model.gan.aux_labels: D's class head gives {logits.shape[1]} logits; the label and "
                f"aux_labels need {self.aux_slices[-1][2]} ({self.aux_slices})"
            )
        for role, start, end in self.aux_slices:
            if role == "label":
                targets = self.labels(batch)
            else:
                targets = batch.get(role)
                if targets is None:  # data without the attribute: nothing to learn from
                    targets = torch.full((len(logits),), -1, dtype=torch.long, device=logits.device)
            if adc:
                classes = (end - start) // 2
                # A label past the attribute's classes is unknown, not one of the fake logits.
                targets = torch.where((targets >= 0) & (targets < classes), targets, -1)
                if fake:
                    targets = torch.where(targets >= 0, targets + classes, targets)
            total = total + class_loss(logits[:, start:end], targets, weights)
        return total

    def labels(self, batch: dict[str, Any]) -> torch.Tensor:
        """The AC-GAN head's targets ``[B]`` (-1: no label, left out). Data without labels (a
        user's captioned photos under a shipped experiment) trains on, the head idle, said once."""
        if "label" in batch:
            return batch["label"]
        if not self._warned_no_labels:
            self._warned_no_labels = True
            log.warning(
                "model.gan.aux_weight > 0 but the data has no class labels (a 'label' in each "
                "sample's json): the AC-GAN head learns nothing; set model.gan.aux_weight=0"
            )
        return torch.full((len(batch[self.target]),), -1, dtype=torch.long, device=self.device)

    def score(self, images: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """D's fp32 logits ``[B]`` and, with the AC-GAN head on, its class logits ``[B, K]``."""
        if self.gan.aux_weight > 0:
            logits, classes = self.discriminator.score(images, batch)
            return logits.float(), classes.float()
        return self.discriminator(images, batch).float(), None

    def recon_distance(self, fake: torch.Tensor, real: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Mean per-row distance of G's image to its pair (``model.gan.recon_loss``), weighted."""
        error = (fake.float() - real.float()).flatten(1)  # [B, C*H*W]
        distance = error.abs() if self.gan.recon_loss == "l1" else error.square()
        return weighted_mean(distance.mean(1), weights)

    def warmup_step(
        self, g_opt: Any, batch: dict[str, Any], real: torch.Tensor, weights: torch.Tensor
    ) -> None:
        """One ``recon_warmup_steps`` iteration: G regresses the pair, D idle."""
        with self.only(g_opt):
            fake = self.generator(self.noise(len(real), salt=self.gan.n_critic), batch)
            recon = self.recon_distance(fake, real, weights)
            g_norm = self.optimizer_step(g_opt, recon)
        self.after_g_step()
        self.log_train_scalars(
            {
                "train/g_loss": recon.detach(),
                "train/g_recon": recon.detach(),
                "train/g_grad_norm": g_norm,
                "train/skipped_steps": float(self.skipped_steps),
            },
            len(real),
        )
        self.finite_or_skip(recon)

    def after_g_step(self) -> None:
        """What ends every iteration, warm-up or GAN: the EMA follows G, the counter moves on."""
        if self.ema is not None:
            decay = ema_decay(self.gan.ema_decay, self.iteration, self.gan.ema_start)
            update_ema(self.ema, self.generator, decay)
        self.iteration += 1

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        g_opt, d_opt = self.optimizers()
        gan = self.gan
        real = batch[self.target]  # [B, C, H, W] (any [B, ...] for injected nets)
        n = real.shape[0]
        valid = batch.get("valid")
        weights = valid.float() if valid is not None else torch.ones(n, device=real.device)  # [B]
        warming = self.iteration < gan.recon_warmup_steps
        for group in g_opt.param_groups:  # from the iteration alone: a resume sets it alike
            group["lr"] = gan.recon_warmup_lr if warming else gan.g_lr
        if warming:
            self.warmup_step(g_opt, batch, real, weights)
            return
        for k in range(gan.n_critic):
            with self.only(d_opt):
                with torch.no_grad():
                    fake = self.generator(self.noise(n, salt=k), batch)
                d_loss, stats = self.d_loss(
                    real, fake.detach(), batch, weights, self.iteration * gan.n_critic + k
                )
                d_norm = self.optimizer_step(d_opt, d_loss)
        with self.only(g_opt):
            fake = self.generator(self.noise(n, salt=gan.n_critic), batch)
            d_out, fake_classes = self.score(self.augment(fake, 30_000), batch)
            g_loss = weighted_mean(g_loss_terms(gan.loss, d_out), weights)
            if fake_classes is not None:
                stats["g_aux"] = self.class_losses(fake_classes, batch, weights)
                g_loss = g_loss + gan.aux_weight * stats["g_aux"]
                stats["g_aux"] = stats["g_aux"].detach()
            if gan.recon_weight > 0:
                recon = self.recon_distance(fake, real, weights)
                g_loss = g_loss + gan.recon_weight * recon
                stats["g_recon"] = recon.detach()
            g_norm = self.optimizer_step(g_opt, g_loss)
        self.after_g_step()
        logged = {
            "train/d_loss": d_loss.detach(),
            "train/g_loss": g_loss.detach(),
            "train/d_grad_norm": d_norm,
            "train/g_grad_norm": g_norm,
            **{f"train/{k}": v for k, v in stats.items()},
        }
        self.log_train_scalars({**logged, "train/skipped_steps": float(self.skipped_steps)}, n)
        self.finite_or_skip(d_loss + g_loss)  # its steps skip themselves; this counts them for the guard

    # ----------------------------------------------------------------------------- evaluation

    @property
    def sampler(self) -> nn.Module:
        """The generator used for samples and metrics: the EMA copy when there is one."""
        return self.ema if self.ema is not None else self.generator

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], z: torch.Tensor) -> torch.Tensor:
        """Images for noise ``z [B, Z]`` under the conditions of ``batch``'s rows."""
        return self.sampler(z.to(self.device), batch)

    def _evaluate(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        # Every rank runs the generator on every batch (under FSDP2 a forward is a collective).
        fake = self.generate(batch, row_noise(batch["__key__"], self.gan.z_dim))  # [B, C, H, W]
        metrics, cycle = self._metrics.get(stage), self._cycle.get(stage)
        if metrics is None and cycle is None:
            return
        valid = batch["valid"].clone()  # [B] False on padding rows
        # At most metric_samples valid rows per rank and pass. Not divided by the world size: the
        # stream splits by shard, so one rank may hold most of a split, and a cap that covers the
        # split then scores every row on any number of ranks (exact).
        room = max(self.gan.metric_samples - self._scored, 0)
        valid[valid.cumsum(0) > room] = False
        self._scored += int(valid.sum())
        if metrics is not None:
            labels = batch.get("label")
            attributes = {role: batch[role][valid] for role in self.gan.judge_labels if role in batch}
            metrics.to(self.device).update(
                batch[self.target][valid],
                fake[valid],
                labels[valid] if labels is not None else None,
                attributes,
            )
        if cycle is not None:
            # The very images FID scored, captioned; each against its own row's captions.
            keep = valid.tolist()
            captions = batch.get("captions") or [[] for _ in keep]
            cycle.update(
                fake[valid],
                [k for k, v in zip(batch["__key__"], keep, strict=True) if v],
                [list(c) for c, v in zip(captions, keep, strict=True) if v],
            )
        if self.is_last_eval_batch(batch_idx):
            self._log_metrics(stage)

    def _log_metrics(self, stage: str) -> None:
        from xmodal.metrics.cycle import log_cycle

        self._scored = 0
        if stage in self._metrics:
            log_split_metrics(self, stage, self._metrics[stage], prog_bar="fid")
        if stage in self._cycle:
            log_cycle(self, stage, self._cycle[stage])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def validation_samples(self, batch: dict[str, Any]) -> SampleSet:
        """Samples from the fixed noise bank under the fixed conditions of the sample batch."""
        n = len(batch["__key__"])
        z = torch.randn(n, self.gan.z_dim, generator=torch.Generator().manual_seed(SAMPLE_SEED))
        fake = self.generate(to_device(batch, self.device), z).cpu()  # [N, C, H, W]
        if not self.conditional:
            return SampleSet({"val": image_grid(fake)})
        shown = condition_names(batch, self.cfg.condition)
        rows = [[key, cond] for key, cond in zip(batch["__key__"], shown, strict=True)]
        return SampleSet({"val": caption_grid(fake, shown)}, ["key", "+".join(self.cfg.conditions())], rows)

    # ----------------------------------------------------------------------------- xmodal-generate
    def generate_outputs(self, inputs: dict[str, list[Any]], args: Any) -> list[dict[str, str]]:
        """``args.num`` seeded images per condition (none, ``--caption``, ``--label``, ``--audio``)
        as PNGs plus ``grid.png`` in ``args.out``."""

        def sample(batch: dict[str, Any], n: int) -> torch.Tensor:
            z = torch.randn(n, self.gan.z_dim, generator=torch.Generator().manual_seed(args.seed))  # [N, Z]
            return self.generate(batch, z)

        return write_conditional_samples(self, self.cfg, inputs, args, sample)


def warm_start_class_head(
    classify: Callable[[torch.Tensor], torch.Tensor],
    params: list[nn.Parameter],
    images: torch.Tensor,
    targets: dict[str, torch.Tensor],
    losses: Callable[[torch.Tensor, dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
    steps: int,
    lr: float,
    seed: int,
) -> float:
    """Train ``params`` so that ``classify`` (images → class logits) fits labelled uint8
    ``images [N, C, H, W]``: ``steps`` batches of 64 (its own Adam and RNG, 2-px random shifts),
    the loss ``losses(logits, {role: labels [64]}, weights [64])`` over ``targets`` (role →
    labels ``[N]``, -1 = unknown). The last batch's loss; NaN when no image has a label."""
    from xmodal.metrics.judge import random_shift

    if not any(bool((t >= 0).any()) for t in targets.values()):
        return float("nan")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    loss = torch.zeros(())
    ones = torch.ones(64, device=images.device)
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(len(images), (64,), generator=gen).to(images.device)
            x = random_shift(images[idx].float() / 127.5 - 1.0, 2, gen)  # [64, C, H, W] in [-1, 1]
            loss = losses(classify(x), {role: t[idx] for role, t in targets.items()}, ones)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return float(loss)
