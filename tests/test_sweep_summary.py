"""The sweep summary table from job folders as a multirun leaves them (the real 2-job sweep is
checked in tests/test_run_identity.py); here the callback is called as Hydra calls it."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

from hydra.core.utils import JobStatus
from hydra.types import RunMode
from hydra.utils import get_class
from omegaconf import OmegaConf

from xmodal.config import CONFIG_DIR
from xmodal.sweep import SweepSummary


def finished_job(sweep_dir: Path, job: int, lr: str, score: float) -> SimpleNamespace:
    """A job folder with its run_dir.txt pointer and the run's summary.json; Hydra's JobReturn."""
    run_dir = sweep_dir.parent.parent / f"run-{job}"
    run_dir.mkdir(parents=True)
    summary = {"status": "finished", "monitor": "val/cider", "best_score": score,
               "best_checkpoint": str(run_dir / "best.ckpt"), "test": {"test/cider": score / 2}}  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (sweep_dir / str(job)).mkdir(parents=True)
    (sweep_dir / str(job) / "run_dir.txt").write_text(f"{run_dir}\n")
    return SimpleNamespace(overrides=["logger=csv", f"model.lr={lr}"], status=JobStatus.COMPLETED)


def hydra_config(sweep_dir: Path, job: int) -> object:
    hydra = {"mode": RunMode.MULTIRUN, "sweep": {"dir": str(sweep_dir)},
             "runtime": {"output_dir": str(sweep_dir / str(job))}}  # fmt: skip
    return OmegaConf.create({"hydra": hydra})


def test_each_finished_job_adds_its_row_and_the_end_prints_the_table(tmp_path, capsys):
    sweep_dir = tmp_path / "outputs" / "multirun" / "s"
    callback = SweepSummary()
    callback.on_job_end(hydra_config(sweep_dir, 0), finished_job(sweep_dir, 0, "1e-3", 0.5))
    with open(sweep_dir / "summary.csv") as f:
        assert [r["model.lr"] for r in csv.DictReader(f)] == ["1e-3"]  # updated as jobs finish
    failed = SimpleNamespace(overrides=["logger=csv", "model.lr=1e-2"], status=JobStatus.FAILED)
    (sweep_dir / "1").mkdir()
    callback.on_job_end(hydra_config(sweep_dir, 1), failed)  # crashed before writing a run dir
    callback.on_job_end(hydra_config(sweep_dir, 2), finished_job(sweep_dir, 2, "3e-4", 0.25))
    callback.on_multirun_end(hydra_config(sweep_dir, 0))
    with open(sweep_dir / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "job", "logger", "model.lr", "status", "best val/cider", "test/cider", "best_checkpoint", "run_dir",
    ]  # fmt: skip
    assert [(r["job"], r["model.lr"], r["status"], r["best val/cider"]) for r in rows] == [
        ("0", "1e-3", "finished", "0.5"),
        ("1", "1e-2", "FAILED", ""),
        ("2", "3e-4", "finished", "0.25"),
    ]
    assert rows[2]["run_dir"] == str(tmp_path / "outputs" / "run-2") and rows[2]["test/cider"] == "0.125"
    # summary.md: only what differs between jobs (model.lr, status; not logger=csv), the scores, the
    # run dir; padded so that it also reads as plain text. Printed the same when the sweep ends.
    run = [str(tmp_path / "outputs" / f"run-{job}") for job in (0, 1, 2)]
    width = len(run[0])
    table = [
        f"| job | model.lr | status   | best val/cider | test/cider | {'run_dir'.ljust(width)} |",
        f"| --- | -------- | -------- | -------------- | ---------- | {'-' * width} |",
        f"| 0   | 1e-3     | finished | 0.5            | 0.25       | {run[0]} |",
        f"| 1   | 1e-2     | FAILED   |                |            | {''.ljust(width)} |",
        f"| 2   | 3e-4     | finished | 0.25           | 0.125      | {run[2]} |",
    ]
    assert (sweep_dir / "summary.md").read_text().splitlines() == table
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        f"sweep summary (3 jobs): {sweep_dir / 'summary.md'} (every column: summary.csv)",
        *table,
    ]


def test_the_markdown_table_is_rebuilt_as_jobs_finish_and_escapes_pipes(tmp_path):
    sweep_dir = tmp_path / "outputs" / "multirun" / "s"
    callback = SweepSummary()
    callback.on_job_end(hydra_config(sweep_dir, 0), finished_job(sweep_dir, 0, "a|b", 0.5))
    run = str(tmp_path / "outputs" / "run-0")
    # One job: nothing differs yet, so no override column; the scores and the run dir are there.
    assert (sweep_dir / "summary.md").read_text().splitlines() == [
        f"| job | best val/cider | test/cider | {'run_dir'.ljust(len(run))} |",
        f"| --- | -------------- | ---------- | {'-' * len(run)} |",
        f"| 0   | 0.5            | 0.25       | {run} |",
    ]
    callback.on_job_end(hydra_config(sweep_dir, 1), finished_job(sweep_dir, 1, "1e-3", 0.5))
    lines = (sweep_dir / "summary.md").read_text().splitlines()
    assert [line.split(" | ")[:2] for line in lines] == [
        ["| job", "model.lr"],
        ["| ---", "--------"],
        ["| 0  ", r"a\|b    "],
        ["| 1  ", "1e-3    "],
    ]


def test_a_single_run_writes_no_table(tmp_path):
    config = OmegaConf.create({"hydra": {"mode": RunMode.RUN, "runtime": {"output_dir": str(tmp_path)}}})
    SweepSummary().on_job_end(config, SimpleNamespace(overrides=[], status=JobStatus.COMPLETED))
    assert list(tmp_path.iterdir()) == []


def test_the_hydra_config_registers_the_callback():
    hydra = OmegaConf.load(CONFIG_DIR / "hydra" / "default.yaml")
    assert get_class(hydra.callbacks.sweep_summary._target_) is SweepSummary
