"""Validation metrics appended to ``metrics.jsonl`` in the run dir, whatever logger is chosen, and
what the FID/KID, judge and cycle scores were measured with in ``metrics_provenance.json`` beside it
(xmodal/metrics/provenance.py), also handed to the loggers (W&B config) when it changes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L

from xmodal.files import write_json_atomic
from xmodal.metrics.provenance import PROVENANCE_FILE, read_provenance


def scalar_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if k.startswith(prefix) and getattr(v, "numel", lambda: 1)() == 1
    }


class MetricsFile(L.Callback):
    """One JSON line per validation, keyed by step; a rerun of a run appends to the same file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.provenance_path = self.path.parent / PROVENANCE_FILE

    def _last_step(self) -> int:
        if not self.path.exists():
            return -1
        lines = self.path.read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else -1

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        # After the module's own epoch-end hook (so what it logs there is in this row), and read
        # on every rank: reading callback_metrics computes synced metrics, a collective that
        # deadlocks DDP when rank zero alone runs it.
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        row = {"step": trainer.global_step, "epoch": trainer.current_epoch}
        row.update(scalar_metrics(metrics, "val/"))
        row.update(scalar_metrics(metrics, "data/"))
        self.write_provenance(trainer, pl_module, ("val",))
        # Lightning repeats the validation a mid-epoch checkpoint was saved in when it resumes
        # from it; that step is already recorded.
        if not trainer.is_global_zero or trainer.global_step <= self._last_step():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")

    def on_test_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.write_provenance(trainer, pl_module, tuple(getattr(pl_module, "metric_provenance", None) or ()))

    def write_provenance(self, trainer: L.Trainer, pl_module: Any, stages: tuple[str, ...]) -> None:
        """Rank zero: ``metrics_provenance.json`` updated with the module's records of ``stages``
        (``{split: {family: record}}``, other splits kept), and the loggers told when it changed."""
        store = getattr(pl_module, "metric_provenance", None) or {}
        fresh = {stage: store[stage] for stage in stages if stage in store}
        if not fresh or not trainer.is_global_zero:
            return
        saved = read_provenance(self.provenance_path.parent)
        merged = {**saved, **fresh}
        if merged == saved:
            return
        write_json_atomic(self.provenance_path, merged)
        for logger in trainer.loggers:  # W&B: config.metric_provenance; CSV: hparams.yaml
            logger.log_hyperparams({"metric_provenance": merged})
