"""What adversarial task families share (the GAN, image → image translation): loss terms from
logits, guarded manual-optimization steps, the FID feature classifier, and their FSDP2 units.

Manual optimization pitfalls handled once, here: losses from logits in fp32 (BCE is unsafe under
autocast); gradient norms measured unscaled under 16-mixed and clipped at ``threshold × scale``;
non-finite steps skipped and counted, never applied; ``toggled_optimizer`` except under FSDP2.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from xmodal.metrics.collapse import warn_if_collapsed
from xmodal.metrics.provenance import record_provenance, task_data

log = logging.getLogger("xmodal")

T = TypeVar("T")


def real_term(loss: str, d_real: torch.Tensor) -> torch.Tensor:
    """Elementwise D loss on logits of real (matching) inputs, fp32."""
    if loss == "ns":
        return F.softplus(-d_real)
    if loss == "hinge":
        return F.relu(1 - d_real)
    if loss == "wgan-gp":
        return -d_real
    if loss == "lsgan":
        return 0.5 * (d_real - 1) ** 2
    raise ValueError(f"unknown adversarial loss {loss!r}")


def fake_term(loss: str, d_fake: torch.Tensor) -> torch.Tensor:
    """Elementwise D loss on logits of inputs D must call fake (generated, or mismatched), fp32."""
    if loss == "ns":
        return F.softplus(d_fake)
    if loss == "hinge":
        return F.relu(1 + d_fake)
    if loss == "wgan-gp":
        return d_fake
    if loss == "lsgan":
        return 0.5 * d_fake**2
    raise ValueError(f"unknown adversarial loss {loss!r}")


def d_loss_terms(loss: str, d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """Elementwise D loss from fp32 logits (``[B]``, or ``[B, 1, h, w]`` patches)."""
    return real_term(loss, d_real) + fake_term(loss, d_fake)


def g_loss_terms(loss: str, d_fake: torch.Tensor) -> torch.Tensor:
    """Elementwise G loss from fp32 logits (non-saturating for ns)."""
    if loss == "ns":
        return F.softplus(-d_fake)
    if loss == "lsgan":
        return 0.5 * (d_fake - 1) ** 2
    return -d_fake


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over rows with weight 1 (padding rows of exact epochs weigh 0; none at all → 0, not NaN)."""
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def class_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of class ``logits [B, K]`` against ``labels [B]`` over weighted rows with a
    known label (-1 or out of range: left out)."""
    known = (labels >= 0) & (labels < logits.shape[1])  # [B]
    ce = F.cross_entropy(logits.float(), labels.clamp(0, logits.shape[1] - 1), reduction="none")  # [B]
    return weighted_mean(ce, weights * known.float())


def rolled_conditions(batch: dict[str, Any], target: str) -> dict[str, Any]:
    """``batch`` with every per-row entry but the ``target`` (and ``valid``) taken from the previous
    row: each target now meets another row's condition (a mismatched pair, GAN-INT-CLS)."""
    n = len(batch[target])
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key in (target, "valid"):
            out[key] = value
        elif isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == n:
            out[key] = value.roll(1, dims=0)
        elif isinstance(value, list) and len(value) == n:
            out[key] = value[-1:] + value[:-1]
        else:
            out[key] = value
    return out


def unscaled_grad_norm(
    params: list[torch.Tensor], max_norm: float | None, scale: float = 1.0
) -> tuple[torch.Tensor, bool]:
    """Total gradient norm as it would be without loss scaling, clipping to ``max_norm`` of it.

    Under 16-mixed the gradients hold ``scale × true`` until the optimizer step unscales them;
    clipping is linear, so clipping the scaled gradients at ``max_norm × scale`` is clipping the
    true ones at ``max_norm``. Returns (true norm, finite). Works on FSDP2's DTensor gradients.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(()), True
    norm = torch.nn.utils.get_total_norm(grads)
    if hasattr(norm, "full_tensor"):  # DTensor (FSDP2): the norm over all shards
        norm = norm.full_tensor()
    finite = bool(torch.isfinite(norm))
    if max_norm is not None and finite:
        coef = min(1.0, max_norm * scale / (float(norm) + 1e-6))
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
    return norm.detach().float() / scale, finite


class GuardedSteps:
    """Mixin of a manual-optimization ``XmodalTask``: guarded optimizer steps and their counters.

    The task sets ``self.iteration`` (training batches done), ``self.skipped_steps`` and
    ``self.max_grad_norm`` in its ``__init__``; both counters are saved in checkpoints under
    ``<checkpoint_prefix>_iteration`` / ``<checkpoint_prefix>_skipped_steps``.
    """

    checkpoint_prefix: ClassVar[str] = "adversarial"
    iteration: int
    skipped_steps: int
    max_grad_norm: float | None

    def loss_scale(self) -> float:
        """The GradScaler's current scale under 16-mixed, else 1."""
        trainer = self._trainer
        scaler = getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None
        return float(scaler.get_scale()) if scaler is not None else 1.0

    def optimizer_step(self, opt: Any, loss: torch.Tensor) -> torch.Tensor:
        """zero_grad → backward → clip on unscaled norms → step; returns the true gradient norm.

        A non-finite gradient never reaches the weights: under a GradScaler its own step skips it
        (and lowers the scale); otherwise the gradients are dropped and the step is a no-op (Adam
        skips parameters without gradients), which Lightning still counts, so iteration
        accounting stays exact.
        """
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        params = [p for group in opt.param_groups for p in group["params"]]
        scale = self.loss_scale()
        norm, finite = unscaled_grad_norm(params, self.max_grad_norm, scale)
        if not finite:
            self.skipped_steps += 1
            if scale == 1.0:
                opt.zero_grad(set_to_none=True)
        opt.step()
        return norm

    def only(self, opt: Any) -> Any:
        """``toggled_optimizer(opt)``: only this optimizer's parameters get gradients.

        Not under FSDP2: it builds its unsharded parameters once, with the ``requires_grad`` the
        sharded ones had then, so toggling later would freeze G for good. There D simply computes
        gradients during the G step too (wasted, never applied: every step starts with zero_grad,
        and G's optimizer steps only G).
        """
        return nullcontext() if self.device_mesh is not None else self.toggled_optimizer(opt)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[f"{self.checkpoint_prefix}_iteration"] = self.iteration
        checkpoint[f"{self.checkpoint_prefix}_skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.iteration = int(checkpoint.get(f"{self.checkpoint_prefix}_iteration", 0))
        self.skipped_steps = int(checkpoint.get(f"{self.checkpoint_prefix}_skipped_steps", 0))

    @property
    def sample_step(self) -> int:
        """Samples are named by training batches, not by Lightning's count of optimizer steps."""
        return self.iteration


def shard_datamodule(task: Any) -> Any:
    """The task's shard datamodule, or None (trained from a plain DataLoader, e.g. in tests)."""
    datamodule = getattr(task.trainer, "datamodule", None) if task._trainer is not None else None
    return datamodule if datamodule is not None and hasattr(datamodule, "shards_dir") else None


def rank_zero_cached(task: Any, build: Callable[[bool], T | None], name: str) -> T | None:
    """``build(train_if_missing)`` on rank zero (trains and caches on a miss) while the others wait
    at a barrier, then ``build(False)`` on the others: one training, one cache file."""
    strategy = task.trainer.strategy
    value = build(True) if strategy.is_global_zero else None
    strategy.barrier(f"xmodal-{name}")
    return value if strategy.is_global_zero else build(False)


def feature_classifier(task: Any, role: str, num_classes: int, steps: int) -> nn.Module | None:
    """The cached domain classifier behind FID/KID for images of ``role`` in the task's data, or
    None when the task is trained without the data module (a plain DataLoader in tests)."""
    datamodule = shard_datamodule(task)
    if datamodule is None:
        return None
    from xmodal.metrics.features import domain_classifier

    def build(train_if_missing: bool) -> nn.Module | None:
        return domain_classifier(
            datamodule.data,  # the run's splits: every source, its carving and explicit val/test
            datamodule.decode,
            num_classes,
            steps,
            allow_pipe=datamodule.allow_pipe,
            role=role,
            train_if_missing=train_if_missing,
        )

    classifier = rank_zero_cached(task, build, "fid-features")
    if classifier is None:
        raise RuntimeError("rank zero's FID feature classifier is missing from the cache dir")
    return classifier


def judge_classifier(
    task: Any, role: str, num_classes: int, steps: int, label_role: str = "label"
) -> nn.Module | None:
    """The cached independent judge (``judge_acc``; ``judge_<label_role>_acc`` for another
    attribute) for images of ``role``, or None: no data module, ``steps`` 0, or no labels of
    ``label_role`` in the train split."""
    datamodule = shard_datamodule(task)
    if datamodule is None or steps <= 0:
        return None
    from xmodal.metrics import judge

    def build(train_if_missing: bool) -> nn.Module | None:
        found = judge.judge_classifier(
            datamodule.data,  # the run's splits: every source, its carving and explicit val/test
            datamodule.decode,
            num_classes,
            steps,
            allow_pipe=datamodule.allow_pipe,
            train_if_missing=train_if_missing,
            role=role,
            label_role=label_role,
        )
        return found[0] if found is not None else None

    return rank_zero_cached(task, build, "judge" if label_role == "label" else f"judge-{label_role}")


def attribute_judge_nets(
    task: Any, role: str, judge_labels: dict[str, int], steps: int
) -> dict[str, nn.Module]:
    """A cached judge per attribute of ``judge_labels`` (role → classes) with labels in the train
    split (``judge_<role>_acc``); one whose role has no labels there is left out, with a warning."""
    nets: dict[str, nn.Module] = {}
    for label_role, classes in judge_labels.items():
        net = judge_classifier(task, role, classes, steps, label_role)
        if net is not None:
            nets[label_role] = net
        elif steps > 0 and shard_datamodule(task) is not None:
            log.warning(
                "no %s judge: the train split has no '%s' labels (key.%s.cls or '%s' in the JSON)",
                label_role,
                label_role,
                label_role,
                label_role,
            )
    return nets


def log_split_metrics(task: Any, stage: str, metrics: Any, prog_bar: str) -> None:
    """Reduce, log and reset a pass's split-level ``metrics`` (``compute() -> {name: float}``,
    ``reset()``) as ``<stage>/<name>``, at the pass's last batch on every rank; NaNs (nothing
    scored) are left out.

    Not in ``on_validation_epoch_end``: callbacks run before that hook, and one that reads
    ``trainer.callback_metrics`` on rank zero only starts a collective (synced logged values)
    that would pair with our reduction on the other ranks and hang. All ranks have the same
    number of evaluation batches (exact epochs pad), so the last batch is a common point.
    """
    values = metrics.compute()  # reduced over ranks: the same on every rank, no sync_dist needed
    metrics.reset()
    # What FID/KID and the judge were measured with (the translation task's FID sits in .generative).
    generative = getattr(metrics, "generative", metrics)
    if callable(getattr(generative, "provenance", None)):
        record_provenance(task, stage, generative.provenance(stage, *task_data(task)))
    warn_if_collapsed(task, stage, values)
    for name, value in values.items():
        if not math.isnan(value):
            task.log(
                f"{stage}/{name}",
                value,
                prog_bar=name == prog_bar,
                on_step=False,
                on_epoch=True,
                batch_size=1,
            )


def shard_each(task: Any, nets: tuple[nn.Module | None, ...], mesh: Any) -> None:
    """Each net one FSDP2 unit; under bf16-mixed parameters gathered in bf16, gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if "bf16" in str(task.trainer.precision):
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for net in nets:
        if net is not None:
            fully_shard(net, mesh=mesh, mp_policy=policy)
