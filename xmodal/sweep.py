"""The sweep summary: ``<sweep dir>/summary.csv``, one row per job of a Hydra multirun.

Each job of ``xmodal-train -m ...`` leaves ``<sweep dir>/<job>/run_dir.txt`` (the run dir it
trained in, xmodal/train.py) and its run's ``summary.json`` (xmodal/summary.py). A Hydra callback
(registered in ``conf/hydra/default.yaml``) writes ``<sweep dir>/<job>/sweep_row.json`` when a job
ends — its overrides, status, best score and test metrics, its run dir — and rebuilds
``summary.csv`` from every row written so far, so the table grows as jobs finish (jobs of a SLURM
launcher end on other nodes: each writes its own row file, and the launcher rebuilds the table once
more at the end of the sweep, when it also prints it).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from xmodal.files import write_json_atomic

ROW_FILE = "sweep_row.json"
TABLE_FILE = "summary.csv"


def job_row(job: str, overrides: Sequence[str], status: str, job_dir: Path) -> dict[str, Any]:
    """One job's row: its overrides (``key=value``) as columns, then what its run's summary says."""
    row: dict[str, Any] = {"job": job}
    for override in overrides:
        key, _, value = override.partition("=")
        row[key.lstrip("+~")] = value
    row["status"] = status
    pointer = job_dir / "run_dir.txt"
    run_dir = Path(pointer.read_text().strip()) if pointer.is_file() else None
    summary_path = run_dir / "summary.json" if run_dir is not None else None
    if summary_path is not None and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        row["status"] = summary["status"] if status == "COMPLETED" else status
        row[f"best {summary['monitor']}"] = summary["best_score"]
        row.update(summary["test"] or {})
        row["best_checkpoint"] = summary["best_checkpoint"]
    row["run_dir"] = str(run_dir) if run_dir is not None else None
    return row


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job's row written so far, in job order."""
    paths = [p for p in sweep_dir.glob(f"*/{ROW_FILE}") if p.parent.name.isdigit()]
    return [json.loads(p.read_text()) for p in sorted(paths, key=lambda p: int(p.parent.name))]


def columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """All keys in first-seen order, with ``run_dir`` and ``best_checkpoint`` last."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    tail = [k for k in ("best_checkpoint", "run_dir") if k in seen]
    return [k for k in seen if k not in tail] + tail


def write_table(sweep_dir: Path) -> list[dict[str, Any]]:
    """Rebuild ``summary.csv`` from the row files (written whole, then renamed); returns the rows."""
    rows = sweep_rows(sweep_dir)
    partial = sweep_dir / f".{TABLE_FILE}.{os.getpid()}"
    with open(partial, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns(rows), restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, sweep_dir / TABLE_FILE)
    return rows


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)


def table_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """The printed table: the columns that differ between jobs, the scores, the run dir."""
    keys = columns(rows)
    scores = [k for k in keys if k.startswith("best ") or k.startswith("test/")]
    varying = [k for k in keys if k not in scores and len({_cell(r.get(k)) for r in rows}) > 1]
    shown = [
        "job",
        *(k for k in varying if k not in ("job", "run_dir", "best_checkpoint")),
        *scores,
        "run_dir",
    ]
    cells = [shown] + [[_cell(r.get(k)) for k in shown] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(shown))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells
    )


class SweepSummary(Callback):
    """Hydra callback: a row per finished job, the table rebuilt each time and at the sweep's end."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        status = getattr(job_return.status, "name", str(job_return.status))
        row = job_row(job_dir.name, list(job_return.overrides or []), status, job_dir)
        write_json_atomic(job_dir / ROW_FILE, row, sort_keys=False)
        write_table(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = write_table(sweep_dir)
        if rows:
            print(
                f"sweep summary ({len(rows)} jobs): {sweep_dir / TABLE_FILE}\n{table_text(rows)}", flush=True
            )
