"""Non-finite steps: counted, skipped, and after ``run.max_nonfinite_steps`` in a row, the run stops.

The task skips a step whose loss or gradient is not finite and records it
(:meth:`xmodal.tasks.base.XmodalTask.finite_or_skip`); this callback counts the records, stops the
run with :class:`NonFiniteStop` when too many come in a row, and tells the checkpoint callbacks
whether the current state may be saved (:func:`save_refusal`). Every rank takes the same decisions:
the task agrees on finiteness across ranks, so the streaks are equal everywhere.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L

from xmodal.checkpoints import nonfinite_tensors, training_tensors

log = logging.getLogger("xmodal")


class NonFiniteStop(RuntimeError):
    """The run diverged: too many non-finite steps in a row (a one-line message, exit code 4)."""


class NonFiniteGuard(L.Callback):
    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.streak = 0
        """Non-finite steps in a row up to the last training batch (0: the last one was finite)."""
        self.total = 0
        """Non-finite (skipped) steps over the whole run, restarts included (saved in checkpoints)."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        record = getattr(pl_module, "nonfinite", None)
        if record is None:
            self.streak = 0
            return
        pl_module.nonfinite = None
        self.streak += 1
        self.total += 1
        pl_module.log("train/nonfinite_steps", float(self.total), batch_size=1)
        what = f"step {record.step}: {record.what} = {record.value}"
        if self.streak >= self.max_in_a_row:
            raise NonFiniteStop(
                f"training diverged: {self.streak} steps in a row were not finite (the last: {what}); "
                "no checkpoint was written from them. Lower model.lr, or raise run.max_nonfinite_steps "
                f"(now {self.max_in_a_row})"
            )
        if trainer.is_global_zero:
            log.warning(
                "%s: optimizer step skipped (%d in a row, %d in all; the run stops at %d in a row)",
                what,
                self.streak,
                self.total,
                self.max_in_a_row,
            )

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self.streak, "total": self.total}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.streak = int(state_dict.get("streak", 0))
        self.total = int(state_dict.get("total", 0))


def save_refusal(trainer: L.Trainer, pl_module: Any) -> str | None:
    """Why the current state must not be checkpointed, or None. Collective: call on every rank.

    Refused: weights, buffers or optimizer states holding a NaN or an infinity, and a state whose
    last training step was not finite (its weights may be finite yet ruined, e.g. by a huge step
    just before: after ``model.lr=1e6`` every weight is ~1e6 and every loss NaN).
    """
    guard = next((c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)), None)
    if guard is not None and guard.streak > 0:
        return f"its last {guard.streak} training step(s) were not finite"
    bad = nonfinite_tensors(training_tensors(pl_module, trainer.optimizers))
    sound = not bad
    if trainer.world_size > 1:  # a shard on another rank may be the bad one
        sound = trainer.strategy.reduce_boolean_decision(sound, all=True)
    if sound:
        return None
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return f"it holds non-finite tensors ({shown or 'on another rank'})"
