"""``metrics.csv`` that keeps its history across restarts (``logger=csv``).

Lightning's CSV writer deletes an existing ``metrics.csv`` when it opens its directory, so every
resume or SLURM requeue of a run wiped the rows of its earlier segments. This writer appends to
the file instead, under its existing header (rewritten whole, old rows kept, when new columns
appear, as Lightning's does). A resumed run repeats the validation its checkpoint was saved in,
so that step may appear twice.
"""

from __future__ import annotations

import csv
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class AppendingExperimentWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            header = next(csv.reader(f), [])
        self.metrics_keys = header  # appended rows follow the existing columns


class HistoryCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
