"""Validation within a short run on short epochs: an integer ``trainer.val_check_interval`` longer
than an epoch *and* than the whole run is clamped to whole epochs — every
``trainer.check_val_every_n_epoch`` epochs (1 by default; ``debug=overfit``'s 50), or every epoch
when that is still longer than the run — with one info line.

An integer interval counts batches across epochs (xmodal passes ``check_val_every_n_epoch=None``
for it), so on a small dataset — 242 images, 4 batches an epoch — ``val_check_interval=250``
still validates every 250 batches of a long run; but a run shorter than the interval (say 200
steps) would never validate: no metrics, no best.ckpt, no test of the best weights. Only then is
the interval clamped: a run long enough for its interval keeps its schedule (the default
experiment's 125-batch epochs keep validating every 250 steps).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L

log = logging.getLogger("xmodal")


def run_batches(trainer: L.Trainer, pl_module: Any) -> float:
    """Training batches this fit runs at most (inf: unbounded). Manual optimization (a GAN) takes at
    least one optimizer step per batch, so ``max_steps`` bounds its batches too."""
    bounds = [math.inf]
    if trainer.max_steps is not None and trainer.max_steps > 0:
        per_step = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        bounds.append(trainer.max_steps * per_step)
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        bounds.append(trainer.max_epochs * trainer.num_training_batches)
    return min(bounds)


def clamped_interval(
    interval: Any, epoch_batches: float, total_batches: float, every_n_epochs: int = 1
) -> int | None:
    """The interval to use instead of ``interval`` (None: keep it) for epochs of ``epoch_batches``
    in a run of ``total_batches``: ``every_n_epochs`` epochs, or one when that is longer than the run."""
    if not isinstance(interval, int) or not math.isfinite(epoch_batches) or epoch_batches < 1:
        return None
    if interval <= epoch_batches or interval <= total_batches:
        return None
    epochs = int(epoch_batches) * max(1, every_n_epochs)
    return epochs if epochs <= total_batches else int(epoch_batches)


class ShortEpochValidation(L.Callback):
    def __init__(self, every_n_epochs: int | None = 1):
        self.every_n_epochs = every_n_epochs or 1

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        # After Lightning's fit loop set up the data: num_training_batches (with limit_train_batches)
        # and val_check_batch (from val_check_interval) are known, and nothing has validated yet.
        epoch, total = trainer.num_training_batches, run_batches(trainer, pl_module)
        clamped = clamped_interval(trainer.val_check_interval, epoch, total, self.every_n_epochs)
        if clamped is None:
            return
        trainer.val_check_batch = clamped
        if trainer.is_global_zero:
            log.info(
                "trainer.val_check_interval=%d is longer than this run (%d batches) and than an epoch "
                "(%d batches): validating every %d batches instead",
                trainer.val_check_interval,
                total,
                epoch,
                clamped,
            )
