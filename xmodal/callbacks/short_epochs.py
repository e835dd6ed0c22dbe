"""Validation within reach of short epochs: an integer ``trainer.val_check_interval`` longer than an
epoch is clamped to the epoch's length (validate at every epoch's end), with one info line.

An integer interval counts batches across epochs (xmodal passes ``check_val_every_n_epoch=None``
for it), so on a small dataset — 242 images, 4 batches an epoch — ``val_check_interval=250`` first
validates after 62 epochs, and a run shorter than that never validates: no metrics, no best.ckpt.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L

log = logging.getLogger("xmodal")


def clamped_interval(interval: Any, epoch_batches: float) -> int | None:
    """The interval to use instead of ``interval`` (None: keep it) for epochs of ``epoch_batches``."""
    if not isinstance(interval, int) or not math.isfinite(epoch_batches) or epoch_batches < 1:
        return None
    return int(epoch_batches) if interval > epoch_batches else None


class ShortEpochValidation(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        # After Lightning's fit loop set up the data: num_training_batches (with limit_train_batches)
        # and val_check_batch (from val_check_interval) are known, and nothing has validated yet.
        batches = trainer.num_training_batches
        clamped = clamped_interval(trainer.val_check_interval, batches)
        if clamped is None:
            return
        trainer.val_check_batch = clamped
        if trainer.is_global_zero:
            log.info(
                "trainer.val_check_interval=%d is longer than an epoch (%d batches): validating at the "
                "end of every epoch instead",
                trainer.val_check_interval,
                clamped,
            )
