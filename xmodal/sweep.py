"""The sweep summary: ``<sweep dir>/summary.csv`` and ``summary.md``, a row per job of a multirun.

Each job of ``xmodal-train -m ...`` leaves ``<sweep dir>/<job>/run_dir.txt`` (the run dir it
trained in, xmodal/train.py) and its run's ``summary.json`` (xmodal/summary.py). A Hydra callback
(registered in ``conf/hydra/default.yaml``) writes ``<sweep dir>/<job>/sweep_row.json`` when a job
ends — its overrides, status, best score and test metrics, its run dir — and rebuilds both tables
from every row written so far, so they grow as jobs finish (jobs of a SLURM launcher end on other
nodes: each writes its own row file, and the launcher rebuilds the tables once more at the end of
the sweep, when it also prints the Markdown one). ``summary.csv`` holds every column, ``summary.md``
the ones a reader compares: the overrides that differ between jobs, the scores, the run dir.

Scores of a metric family (FID/KID, judge, cycle) are comparable only between jobs of the same
metric provenance (xmodal/metrics/provenance.py: feature extractor and its weights, image size,
reference split and counts): each row keeps its run's records, ``summary.csv`` gets one
``provenance <split>/<family>`` id column per family, and where jobs differ the Markdown table marks
every such cell with its provenance (``[a]``, ``[b]``) and names the difference in a note below it.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from xmodal.files import write_json_atomic
from xmodal.metrics.provenance import comparable, family_of, provenance_id, read_provenance, stage_of

ROW_FILE = "sweep_row.json"
TABLE_FILE = "summary.csv"
MARKDOWN_FILE = "summary.md"


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
    if run_dir is not None and (provenance := read_provenance(run_dir)):
        row["provenance"] = provenance
    row["run_dir"] = str(run_dir) if run_dir is not None else None
    return row


def cell_provenance(row: Mapping[str, Any], column: str) -> dict[str, Any] | None:
    """The provenance record behind a score cell (``best val/fid``, ``test/judge_acc``), or None."""
    family, stage = family_of(column), stage_of(column)
    if family is None or stage is None:
        return None
    return ((row.get("provenance") or {}).get(stage) or {}).get(family)


def provenance_marks(
    rows: Sequence[Mapping[str, Any]], shown: Sequence[str]
) -> tuple[dict[tuple[int, str], str], list[str]]:
    """Marks for score cells whose family's provenance differs between jobs, and the note lines
    that name each difference: ``({(row index, column): "[b]"}, ["note: ..."])``. Cells of a family
    whose jobs all share one provenance get no mark."""
    marks: dict[tuple[int, str], str] = {}
    notes: list[str] = []
    groups: dict[tuple[str, str], list[str]] = {}
    for column in shown:
        if family_of(column) is not None and stage_of(column) is not None:
            groups.setdefault((str(stage_of(column)), str(family_of(column))), []).append(column)
    for group in groups.values():
        records: dict[str, dict[str, Any]] = {}  # provenance id → record, first seen first
        jobs: dict[str, list[str]] = {}
        for row in rows:
            record = cell_provenance(row, group[0])
            if record is not None and any(row.get(c) not in (None, "") for c in group):
                pid = provenance_id(record)
                records.setdefault(pid, record)
                jobs.setdefault(pid, []).append(str(row.get("job")))
        if len(records) < 2:
            continue
        letters = {pid: f"[{chr(ord('a') + i)}]" for i, pid in enumerate(records)}
        for i, row in enumerate(rows):
            record = cell_provenance(row, group[0])
            for column in group:
                if record is not None and row.get(column) not in (None, ""):
                    marks[(i, column)] = letters[provenance_id(record)]
        first, *others = records
        for pid in others:
            notes.append(
                f"note: {', '.join(group)} of different metric provenance, not comparable: "
                f"{letters[first]} (jobs {', '.join(jobs[first])}) vs {letters[pid]} "
                f"(jobs {', '.join(jobs[pid])}): {comparable(records[first], records[pid])}"
            )
    return marks, notes


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job's row written so far, in job order."""
    paths = [p for p in sweep_dir.glob(f"*/{ROW_FILE}") if p.parent.name.isdigit()]
    return [json.loads(p.read_text()) for p in sorted(paths, key=lambda p: int(p.parent.name))]


def columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """All keys in first-seen order, with ``run_dir`` and ``best_checkpoint`` last (the nested
    ``provenance`` records are no column: :func:`csv_text` gives their ids)."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(k for k in row if k != "provenance"))
    tail = [k for k in ("best_checkpoint", "run_dir") if k in seen]
    return [k for k in seen if k not in tail] + tail


def _write_atomic(path: Path, text: str) -> None:
    """Written whole, then renamed: a reader (or a job ending at the same time) never sees half a table."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    with open(partial, "w", newline="") as f:
        f.write(text)
    os.replace(partial, path)


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """Every column of every row, as CSV."""
    keys = columns(rows)
    ids = sorted(
        {
            f"provenance {stage}/{family}"
            for r in rows
            for stage, fs in (r.get("provenance") or {}).items()
            for family in fs
        }
    )
    tail = [k for k in ("best_checkpoint", "run_dir") if k in keys]
    fieldnames = [k for k in keys if k not in tail] + ids + tail
    flat = []
    for row in rows:
        cells = {k: v for k, v in row.items() if k != "provenance"}
        for stage, families in (row.get("provenance") or {}).items():
            for family, record in families.items():
                cells[f"provenance {stage}/{family}"] = provenance_id(record)
        flat.append(cells)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fieldnames, restval="")
    writer.writeheader()
    writer.writerows(flat)
    return out.getvalue()


def write_table(sweep_dir: Path) -> list[dict[str, Any]]:
    """Rebuild ``summary.csv`` and ``summary.md`` from the row files and the ``runs/`` aliases;
    returns the rows."""
    rows = sweep_rows(sweep_dir)
    _write_atomic(sweep_dir / TABLE_FILE, csv_text(rows))
    _write_atomic(sweep_dir / MARKDOWN_FILE, markdown_table(rows) + "\n")
    link_aliases(sweep_dir, rows)
    return rows


def alias_name(row: Mapping[str, Any], varying: Sequence[str]) -> str:
    """``3_model.lr=0.001,seed=2``: the job number and the override values that differ between
    jobs, as a file name (a path separator in a value becomes ``_``, long names are cut)."""
    point = ",".join(f"{k}={_cell(row.get(k))}" for k in varying)
    name = f"{row['job']}_{point}" if point else str(row["job"])
    return name.replace(os.sep, "_")[:200]


def link_aliases(sweep_dir: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``<sweep dir>/runs/<alias>`` → each job's run dir, named by what differs between jobs so far
    (run dirs themselves are named by run id: a timestamp or the SLURM job id). Rebuilt as jobs
    finish, since the set of differing overrides grows with them."""
    varying = [k for k in shown_columns(rows) if k not in ("job", "run_dir", "status")]
    varying = [k for k in varying if not k.startswith(("best ", "test/"))]
    runs = sweep_dir / "runs"
    runs.mkdir(exist_ok=True)
    wanted = {alias_name(r, varying): Path(r["run_dir"]) for r in rows if r.get("run_dir")}
    for link in runs.iterdir():
        if link.is_symlink() and link.name not in wanted:
            link.unlink(missing_ok=True)
    for name, target in wanted.items():
        link = runs / name
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        partial = runs / f".{name}.{os.getpid()}"
        partial.unlink(missing_ok=True)
        partial.symlink_to(target, target_is_directory=True)
        os.replace(partial, link)  # atomic: another job rebuilding at once sees old or new


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)


def shown_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """What a reader compares: the job, the columns that differ between jobs (overrides, status),
    the scores (best monitor, test metrics), the run dir."""
    keys = columns(rows)
    scores = [k for k in keys if k.startswith("best ") or k.startswith("test/")]
    varying = [k for k in keys if k not in scores and len({_cell(r.get(k)) for r in rows}) > 1]
    return [
        "job",
        *(k for k in varying if k not in ("job", "run_dir", "best_checkpoint")),
        *scores,
        "run_dir",
    ]


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The shown columns as a Markdown table, padded so that it reads as plain text too; score cells
    of differing metric provenance marked, with a note line per difference below the table."""
    shown = shown_columns(rows)
    marks, notes = provenance_marks(rows, shown)
    lines = [shown]
    for i, r in enumerate(rows):
        lines.append([_cell(r.get(k)) + (f" {marks[(i, k)]}" if (i, k) in marks else "") for k in shown])
    lines = [[cell.replace("|", "\\|") for cell in line] for line in lines]  # "|" would end a cell
    widths = [max(3, *(len(line[i]) for line in lines)) for i in range(len(shown))]

    def text(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    table = [text(lines[0]), text(["-" * w for w in widths]), *map(text, lines[1:])]
    return "\n".join([*table, *([""] + notes if notes else [])])


class SweepSummary(Callback):
    """Hydra callback: a row per finished job, the tables rebuilt each time and at the sweep's end."""

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
                f"sweep summary ({len(rows)} jobs): {sweep_dir / MARKDOWN_FILE} (every column: {TABLE_FILE})\n"
                f"{markdown_table(rows)}",
                flush=True,
            )
