"""``checkpoints/last.ckpt``: the latest sound state, written after every validation and at the end of fit.

Lightning's ``ModelCheckpoint(save_last=True)`` refreshes ``last.ckpt`` only when a top-k
checkpoint was saved in the same step, so with a monitored metric that stops improving, "last"
silently stays behind and a resumed run repeats work. This callback always writes it, through a
temporary name and a rename, so an interrupted write never replaces a good checkpoint. The one it
replaces is kept as ``last.prev.ckpt``: the fallback when ``last.ckpt`` is found corrupt later
(:func:`xmodal.checkpoints.choose_resume`). A state that is not sound (non-finite tensors, or a
non-finite last step: :func:`xmodal.callbacks.nonfinite.save_refusal`) is not written at all.

The end-of-fit checkpoint of a run stopped by ``max_steps`` inside an epoch says that epoch is
unfinished (:func:`reopen_unfinished_epoch`), as a mid-epoch validation checkpoint does.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L

from xmodal.callbacks.nonfinite import save_refusal
from xmodal.checkpoints import PREVIOUS, fsync_dir

log = logging.getLogger("xmodal")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def reopen_unfinished_epoch(trainer: L.Trainer, checkpoint: dict[str, Any]) -> None:
    """Mark the epoch of an end-of-fit ``checkpoint`` unfinished when fit stopped inside it.

    When ``max_steps`` stops fit mid-epoch, Lightning's fit loop still counts the epoch processed
    and completed before ``on_train_end``; a resume from a checkpoint written then starts the next
    epoch at the saved batch index: the data stream is moved to the next epoch's order and the
    rest of this epoch is never trained (a resumed run then differs from an uninterrupted one).
    The counts are put back to "started, not finished", what a mid-epoch validation checkpoint holds.
    """
    if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
        return  # the epoch did end: the next one is right
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress")
    if progress is None:
        return
    for counts in (progress["total"], progress["current"]):
        if counts["started"] > 0 and counts["processed"] == counts["started"]:
            counts["processed"] = counts["completed"] = counts["started"] - 1


class LastCheckpoint(L.Callback):
    def __init__(self, path: Path):
        self.path = Path(path)
        self.previous = self.path.with_name(PREVIOUS)
        self.saved_step = -1
        self.fit_ended = False  # set in on_train_end: the loop counts are a finished fit's

    def save_if_sound(self, trainer: L.Trainer) -> bool:
        """Write the checkpoint unless the state is unsound (then keep the last one); every rank calls it."""
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.global_step == self.saved_step:
            return False
        refusal = save_refusal(trainer, trainer.lightning_module)
        if refusal is not None:
            if trainer.is_global_zero:
                kept = "the previous one stays" if self.path.exists() else "none written yet"
                log.warning("step %d: %s not written: %s; %s", trainer.global_step, self.path, refusal, kept)
            return False
        self.save(trainer)
        return True

    def save(self, trainer: L.Trainer) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.global_step == self.saved_step:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        if trainer.is_global_zero:
            _remove(tmp)
        trainer.strategy.barrier("last_checkpoint_clean")
        try:
            # Every rank takes part: sharded strategies write a directory. The full state (loops,
            # callbacks, the data stream position) is what resuming needs; said explicitly, since
            # Lightning logs "weights_only was not set" at every save otherwise.
            trainer.save_checkpoint(tmp, weights_only=False)
        except Exception:
            if trainer.is_global_zero:
                _remove(tmp)  # e.g. disk full: no partial file left behind
            raise
        trainer.strategy.barrier("last_checkpoint_written")
        if trainer.is_global_zero:
            self._replace(tmp)
        trainer.strategy.barrier("last_checkpoint_renamed")
        self.saved_step = trainer.global_step

    def _replace(self, tmp: Path) -> None:
        """tmp → last.ckpt, the old last.ckpt → last.prev.ckpt."""
        if self.path.is_dir():  # a directory cannot be renamed over a non-empty one
            _remove(self.previous)
            os.replace(self.path, self.previous)
        elif self.path.exists():
            # A hard link keeps last.ckpt in place until the final rename: no moment without it.
            staged = self.previous.with_name(self.previous.name + ".tmp")
            _remove(staged)
            try:
                os.link(self.path, staged)
                os.replace(staged, self.previous)
            except OSError:  # no hard links on this file system
                _remove(self.previous)
                os.replace(self.path, self.previous)
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.state.fn == "fit":
            self.save_if_sound(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.fit_ended = True
        try:
            self.save_if_sound(trainer)
        finally:
            self.fit_ended = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if self.fit_ended:
            reopen_unfinished_epoch(trainer, checkpoint)
