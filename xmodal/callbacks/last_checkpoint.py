"""``checkpoints/last.ckpt``: the latest state, written after every validation and at the end of fit.

Lightning's ``ModelCheckpoint(save_last=True)`` refreshes ``last.ckpt`` only when a top-k
checkpoint was saved in the same step, so with a monitored metric that stops improving, "last"
silently stays behind and a resumed run repeats work. This callback always writes it, through a
temporary name and a rename, so an interrupted write never replaces a good checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


class LastCheckpoint(L.Callback):
    def __init__(self, path: Path):
        self.path = Path(path)
        self.saved_step = -1

    def save(self, trainer: L.Trainer) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.global_step == self.saved_step:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        old = self.path.with_name(self.path.name + ".old")
        if trainer.is_global_zero:
            _remove(tmp)
        trainer.strategy.barrier("last_checkpoint_clean")
        trainer.save_checkpoint(tmp)  # every rank takes part: sharded strategies write a directory
        trainer.strategy.barrier("last_checkpoint_written")
        if trainer.is_global_zero:
            # A directory cannot be renamed over a non-empty one: move the old one aside first.
            if self.path.is_dir():
                os.replace(self.path, old)
            os.replace(tmp, self.path)
            _remove(old)
        trainer.strategy.barrier("last_checkpoint_renamed")
        self.saved_step = trainer.global_step

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.state.fn == "fit":
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.save(trainer)
