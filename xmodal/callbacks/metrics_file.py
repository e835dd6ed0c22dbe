"""Validation metrics appended to ``metrics.jsonl`` in the run dir, whatever logger is chosen."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L


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
        # Lightning repeats the validation a mid-epoch checkpoint was saved in when it resumes
        # from it; that step is already recorded.
        if not trainer.is_global_zero or trainer.global_step <= self._last_step():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
