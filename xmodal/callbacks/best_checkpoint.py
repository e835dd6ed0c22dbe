"""``checkpoints/best.ckpt``: Lightning's top-1 ``ModelCheckpoint``, never given a non-finite score or state.

Lightning ranks a NaN monitor value as the worst possible one, yet still saves it while fewer than
``save_top_k`` checkpoints exist: a run whose first validation is NaN gets a "best" checkpoint of
NaN weights. And a diverged model can score a finite value (BLEU 0.0 from NaN weights): so the
state is checked too (:func:`xmodal.callbacks.nonfinite.save_refusal`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from xmodal.callbacks.nonfinite import save_refusal

log = logging.getLogger("xmodal")


class BestCheckpoint(ModelCheckpoint):
    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        current = monitor_candidates.get(self.monitor) if self.monitor else None
        # The monitored value is synced over ranks: every rank takes this branch alike.
        if current is not None and not math.isfinite(float(current)):
            refusal: str | None = f"{self.monitor} = {float(current)}"
        else:
            refusal = save_refusal(trainer, trainer.lightning_module)
        if refusal is not None:
            if trainer.is_global_zero:
                log.warning("step %d: best checkpoint not considered: %s", trainer.global_step, refusal)
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    @property
    def state_key(self) -> str:
        # Lightning keys a callback's checkpointed state by its class name: keep ModelCheckpoint's,
        # so runs checkpointed before this subclass existed still resume their best score.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)
