"""``checkpoints/best.ckpt``: Lightning's top-1 ``ModelCheckpoint``, never given a non-finite score or
state, and never ranking scores of different metric provenance against each other.

Lightning ranks a NaN monitor value as the worst possible one, yet still saves it while fewer than
``save_top_k`` checkpoints exist: a run whose first validation is NaN gets a "best" checkpoint of
NaN weights. And a diverged model can score a finite value (BLEU 0.0 from NaN weights): so the
state is checked too (:func:`xmodal.callbacks.nonfinite.save_refusal`).

A monitored FID (KID, judge or cycle score) is a number in one feature space over one sample
(xmodal/metrics/provenance.py). The provenance of the best score is saved with the tracker's
state; when a resumed run scores under another one (the feature cache was retrained, Inception
weights swapped in, another sample count), the old best cannot be beaten or kept on merit, so the
tracking restarts there with one warning. A restart rather than a refusal: training itself is
unaffected, refusing would leave the run unresumable for a metric-side change, and ``best.ckpt``
then means the best under the provenance the run now reports.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from xmodal.callbacks.nonfinite import save_refusal
from xmodal.metrics.provenance import comparable, family_of, stage_of

log = logging.getLogger("xmodal")


def restart_message(monitor: str, best: float, reason: str) -> str:
    """The one warning of a provenance restart."""
    return (
        f"{monitor}: the best score so far ({best:.4g}) was measured with another metric provenance "
        f"({reason}); scores are not comparable, so best-checkpoint tracking restarts at this "
        "validation (best.ckpt is replaced by its checkpoint)"
    )


def monitored_provenance(monitor: str | None, module: Any) -> dict[str, Any] | None:
    """The current provenance record of the monitored metric's family, or None (no family: a loss,
    BLEU; or the module recorded none)."""
    if not monitor or family_of(monitor) is None:
        return None
    store = getattr(module, "metric_provenance", None) or {}
    return (store.get(stage_of(monitor) or "val") or {}).get(family_of(monitor))


class BestCheckpoint(ModelCheckpoint):
    """Top-1 only (``save_top_k=1``): every ``_update_best_and_save`` call makes the current score the best."""

    best_provenance: dict[str, Any] | None = None
    """Provenance of ``best_model_score`` (saved in the callback state; None: unknown or no family)."""
    _current_provenance: dict[str, Any] | None = None

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
        # Provenance records are alike on every rank (hashes of the same weights, reduced counts).
        provenance = monitored_provenance(self.monitor, trainer.lightning_module)
        if self.best_model_score is not None and (reason := comparable(self.best_provenance, provenance)):
            if trainer.is_global_zero:
                log.warning("%s", restart_message(str(self.monitor), float(self.best_model_score), reason))
            self.restart_tracking()
        if provenance is not None and self.best_provenance is None and self.best_model_score is not None:
            self.best_provenance = provenance  # a best from before provenance: adopted, not judged
        self._current_provenance = provenance
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _update_best_and_save(
        self, current: torch.Tensor, trainer: L.Trainer, monitor_candidates: dict[str, Any]
    ) -> None:
        # Before the save: the checkpoint written there holds this callback's state.
        self.best_provenance = self._current_provenance
        super()._update_best_and_save(current, trainer, monitor_candidates)

    def restart_tracking(self) -> None:
        """Forget the best score (and its provenance): the next finite score becomes the best."""
        self.best_k_models = {}
        self.kth_best_model_path = ""
        self.best_model_score = None
        self.best_model_path = ""
        self.current_score = None
        self.kth_value = torch.tensor(math.inf if self.mode == "min" else -math.inf)
        self.best_provenance = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "metric_provenance": self.best_provenance}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            self.best_provenance = state_dict.get("metric_provenance")

    @property
    def state_key(self) -> str:
        # Lightning keys a callback's checkpointed state by its class name: keep ModelCheckpoint's,
        # so runs checkpointed before this subclass existed still resume their best score.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)
