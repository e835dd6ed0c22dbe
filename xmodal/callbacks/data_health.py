"""Skipped samples as metrics: bad data is counted per shard by the stream, and shown here.

At each validation, summed over ranks (every rank skips within its own slots):
``data/skipped_val`` = samples skipped by this validation pass, ``data/skipped_train`` = samples
skipped by training so far in this fit. Both reach the loggers and ``metrics.jsonl``, so a run
that quietly loses data shows it.
"""

from __future__ import annotations

from typing import Any

import lightning as L


def _total(datamodule: Any, split: str) -> int:
    return sum(datamodule.skipped().get(split, {}).values())


class DataHealth(L.Callback):
    def __init__(self) -> None:
        self._val_before = 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if hasattr(trainer.datamodule, "skipped"):
            self._val_before = _total(trainer.datamodule, "val")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        datamodule = trainer.datamodule
        if trainer.sanity_checking or not hasattr(datamodule, "skipped"):
            return
        this_pass = float(_total(datamodule, "val") - self._val_before)
        pl_module.log("data/skipped_val", this_pass, reduce_fx="sum", sync_dist=True)
        pl_module.log(
            "data/skipped_train", float(_total(datamodule, "train")), reduce_fx="sum", sync_dist=True
        )
