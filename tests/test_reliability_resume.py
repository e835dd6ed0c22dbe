"""Resuming a run id: config drift refused before anything is written, one job per run dir, corrupt
checkpoints moved aside for the newest intact one, CSV history kept (issue 16)."""

from __future__ import annotations

import csv
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import TINY, checkpoint_tensors, run_cli
from xmodal.callbacks.nonfinite import NonFiniteStop
from xmodal.checkpoints import (
    NoIntactCheckpoint,
    RunDirCheckpointIO,
    checkpoint_problem,
    choose_resume,
    nonfinite_tensors,
)
from xmodal.config import ConfigError, compose_config
from xmodal.drift import check_drift, world_size_note
from xmodal.run import RUN_ID_ENV
from xmodal.run_lock import RunBusy, RunLock
from xmodal.tasks.caption.task import CaptionTask
from xmodal.train import RunStopped, train

# Small and quick: no sanity validation, one validation batch, no sample grids, a small captioner.
STEPS = ["logger=csv", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "test_after_fit=false",
         "trainer.num_sanity_val_steps=0", "callbacks.num_samples=0",
         "model.d_model=32", "model.encoder_channels=[16,32]", "model.decoder_layers=1"]  # fmt: skip


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_PROCID", RUN_ID_ENV):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def base_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step captioner run (checkpoints at steps 2 and 4), copied by each test."""
    out = tmp_path_factory.mktemp("base")
    train(compose_config([*TINY, f"paths.data_dir={data_dir}", f"paths.output_dir={out}", *STEPS,
                          "trainer.max_steps=4", "run.id=R"]))  # fmt: skip
    return out / "shapes_caption" / "R"


@pytest.fixture
def run(base_run: Path, data_dir: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """(this test's copy of the base run dir, the overrides that resume it)."""
    run_dir = tmp_path / "outputs" / "shapes_caption" / "R"
    shutil.copytree(base_run, run_dir)
    args = [
        *TINY,
        f"paths.data_dir={data_dir}",
        f"paths.output_dir={tmp_path / 'outputs'}",
        *STEPS,
        "run.id=R",
    ]
    return run_dir, args


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- drift
def test_a_resume_that_changes_the_model_is_refused_before_anything_is_written(run, tmp_path):
    run_dir, args = run
    before = snapshot(run_dir)
    result = run_cli(["xmodal-train", *args, "trainer.max_steps=6", "model.heads=8"], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "model.heads: 4 → 8" in result.stderr
    assert "another run.id" in result.stderr and "run.allow_changes=[model.heads]" in result.stderr
    assert "trainer.max_steps" not in result.stderr  # harmless: not among the refused keys
    assert "Traceback" not in result.stderr
    after = snapshot(run_dir)
    assert after.pop("run.lock") == b"" and before.pop("run.lock") == b""  # released on exit
    assert after == before  # config.yaml byte-identical, no metrics row, no checkpoint touched


def test_harmless_changes_pass_and_unknown_allow_keys_are_refused(run):
    run_dir, args = run
    # This copy of the run lives elsewhere: its paths changed too, harmlessly, and are recorded.
    moved = check_drift(run_dir, _resolved(args, "trainer.max_steps=4"))
    assert moved and all(line.startswith(("paths.output_dir:", "run.dir:")) for line in moved)
    assert check_drift(run_dir, _resolved(args, "trainer.max_steps=8")) == sorted(
        [*moved, "trainer.max_steps: 4 → 8"]
    )
    with pytest.raises(Exception, match=r"run.allow_changes: 'model.head' names no config key"):
        train(compose_config([*args, "run.allow_changes=[model.head]"]))


def test_the_world_size_may_change_on_resume_unless_the_weights_are_sharded(run, tmp_path):
    run_dir, args = run
    ddp = ["trainer=ddp_cpu", "trainer.max_steps=4"]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(_resolved(args, *ddp), resolve=True))
    lines = check_drift(tmp_path, _resolved(args, *ddp, "trainer.devices=1", "trainer.strategy=auto"))
    assert "trainer.devices: 2 → 1" in lines and "trainer.strategy: 'ddp' → 'auto'" in lines
    assert world_size_note(lines).startswith("the world size changes on resume (trainer.devices: 2 → 1;")
    assert world_size_note([line for line in lines if not line.startswith("trainer.")]) is None
    fsdp = ["trainer=fsdp2", "trainer.max_steps=4"]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(_resolved(args, *fsdp), resolve=True))
    with pytest.raises(
        ConfigError, match=r"(?s)trainer.devices: 2 → 3.*run.allow_changes=\[trainer.devices\]"
    ):
        check_drift(tmp_path, _resolved(args, *fsdp, "trainer.devices=3"))
    with pytest.raises(ConfigError, match=r"trainer.strategy: 'ddp' → 'fsdp2'"):
        (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(_resolved(args, *ddp), resolve=True))
        check_drift(tmp_path, _resolved(args, *ddp, "trainer.strategy=fsdp2"))


def _resolved(args: list[str], *more: str):
    from omegaconf import open_dict

    cfg = compose_config([*args, *more])
    with open_dict(cfg):  # as train() fills them in
        cfg.run.dir = str(Path(cfg.paths.output_dir) / cfg.experiment_name / cfg.run.id)
    return cfg


def test_an_allowed_change_resumes_keeps_the_config_history_and_the_csv_rows(run):
    run_dir, args = run
    first_config = (run_dir / "config.yaml").read_text()
    train(compose_config([*args, "trainer.max_steps=6", "model.heads=8", "run.allow_changes=[model.heads]"]))
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 6
    assert (run_dir / "config.1.yaml").read_text() == first_config  # the previous one, kept
    assert "heads: 8" in (run_dir / "config.yaml").read_text()
    last_start = (run_dir / "cmd.txt").read_text().splitlines()[-2]
    assert "model.heads: 4 → 8" in last_start and "trainer.max_steps: 4 → 6" in last_start
    assert "previous config kept as config.1.yaml" in last_start
    # Lightning's CSV logger deleted metrics.csv on every resume: both segments' rows are there.
    with open(run_dir / "metrics.csv", newline="") as f:
        val_steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("val/loss")]
    assert {1, 3} <= set(val_steps) and 5 in val_steps  # Lightning logs step N's validation at N-1


# ----------------------------------------------------------------------------- lock
HOLDER = """
import sys, time
from pathlib import Path
from xmodal.run_lock import RunLock
RunLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold_lock(run_dir: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_start_of_a_running_run_is_refused_naming_the_holder(run, tmp_path):
    run_dir, args = run
    holder = hold_lock(run_dir)
    try:
        before = snapshot(run_dir)
        result = run_cli(["xmodal-train", *args, "trainer.max_steps=6"], tmp_path)
        assert result.returncode == 5, result.stderr[-3000:]
        assert f"is in use by pid {holder.pid} on " in result.stderr and "Traceback" not in result.stderr
        assert snapshot(run_dir) == before  # no metrics row, no log line, no checkpoint, lock intact
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holder_and_a_requeued_slurm_job_take_over(tmp_path, monkeypatch, caplog):
    holder = hold_lock(tmp_path)
    holder.send_signal(signal.SIGKILL)  # dies holding it: the file still names it
    holder.wait()
    assert f'"pid": {holder.pid}' in (tmp_path / "run.lock").read_text()
    lock = RunLock(tmp_path)
    with caplog.at_level(logging.INFO, logger="xmodal"):
        lock.acquire()  # the OS dropped the flock with the process
    assert "is stale" in caplog.text and f'"pid": {os.getpid()}' in (tmp_path / "run.lock").read_text()
    lock.release()

    env = {**os.environ, "SLURM_JOB_ID": "4242"}
    holder = hold_lock(tmp_path, env)  # alive, as SLURM job 4242
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        with pytest.raises(RunBusy, match=r"SLURM job 4242"):
            RunLock(tmp_path).acquire()
        monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the same job, requeued
        lock = RunLock(tmp_path)
        lock.acquire()
        assert '"slurm_job": "4242"' in (tmp_path / "run.lock").read_text()
        lock.release()
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------- checkpoints
def test_a_truncated_last_checkpoint_is_moved_aside_and_the_newest_intact_one_resumes(run, caplog):
    run_dir, args = run
    ckpts = run_dir / "checkpoints"
    last = ckpts / "last.ckpt"
    fallback = newest_fallback(ckpts)
    damaged = last.read_bytes()[: last.stat().st_size // 2]
    last.write_bytes(damaged)  # measured on main: a torch zip traceback, for good
    with caplog.at_level(logging.WARNING, logger="xmodal"):
        train(compose_config([*args, "trainer.max_steps=6"]))
    (kept,) = ckpts.glob("last.ckpt.corrupt-*")
    assert kept.read_bytes() == damaged  # kept as it was, never deleted
    assert f"{last} is unusable" in caplog.text and f"resuming from {fallback} instead" in caplog.text
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 6
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]  # went on to the end; the rows already written are kept
    assert checkpoint_problem(last) is None and checkpoint_problem(ckpts / "last.prev.ckpt") is None


def newest_fallback(ckpts: Path) -> Path:
    """The newer of the previous last (step 2) and best (step 2 or 4, by the score)."""
    return max((ckpts / "last.prev.ckpt", ckpts / "best.ckpt"), key=lambda p: p.stat().st_mtime_ns)


@pytest.mark.parametrize("damage", ["zero-filled", "empty"])
def test_a_zeroed_last_checkpoint_gives_way_to_the_newest_intact_one(run, damage, caplog):
    run_dir, _ = run
    ckpts = run_dir / "checkpoints"
    last = ckpts / "last.ckpt"
    fallback = newest_fallback(ckpts)
    last.write_bytes(bytes(last.stat().st_size) if damage == "zero-filled" else b"")  # main: a bare EOFError
    with caplog.at_level(logging.WARNING, logger="xmodal"):
        assert choose_resume(run_dir, move_corrupt=False) == fallback  # another rank: looks, moves nothing
        assert last.exists()
        assert choose_resume(run_dir, move_corrupt=True) == fallback  # the launcher
    (kept,) = ckpts.glob("last.ckpt.corrupt-*")
    assert not last.exists() and set(kept.read_bytes()) <= {0}
    assert f"resuming from {fallback} instead" in caplog.text
    assert torch.load(fallback, weights_only=False)["global_step"] in (2, 4)


def test_no_intact_checkpoint_refuses_and_moves_nothing(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "last.ckpt").write_bytes(b"")
    (ckpts / "best.ckpt").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(NoIntactCheckpoint, match=r"no intact checkpoint.*last.ckpt: 0 bytes"):
        choose_resume(tmp_path, move_corrupt=True)
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert choose_resume(tmp_path / "elsewhere", move_corrupt=True) is None  # a new run: nothing to do


def test_checkpoint_writes_stay_beside_their_target_and_leave_no_partial_file(tmp_path, monkeypatch):
    import tempfile

    def no_temp_dir(*args, **kwargs):
        raise OSError(28, "No space left on device (the system temp dir)")

    monkeypatch.setattr(tempfile, "mkstemp", no_temp_dir)  # where Lightning's own writer stages
    target = tmp_path / "best.ckpt"
    io = RunDirCheckpointIO()
    io.save_checkpoint({"step": 1}, target)
    assert torch.load(target)["step"] == 1 and checkpoint_problem(target) is None

    with pytest.raises(Exception):  # noqa: B017 (whatever torch raises for an unpicklable value)
        io.save_checkpoint({"step": 2, "bad": lambda: None}, target)
    assert torch.load(target)["step"] == 1  # the failed write replaced nothing ...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt"]  # ... and left nothing


# ----------------------------------------------------------------------------- non-finite, stops
def test_a_resumed_run_that_goes_nan_never_overwrites_the_last_good_checkpoint(run, monkeypatch):
    run_dir, args = run
    ckpts = run_dir / "checkpoints"
    good = {name: t.clone() for name, t in checkpoint_tensors(ckpts / "last.ckpt")}

    # From step 5 an optimizer step "explodes": every weight infinite, every loss after it NaN.
    step = CaptionTask.training_step

    def exploding(self, batch, batch_idx):
        if self.global_step >= 5:
            with torch.no_grad():
                for p in self.parameters():
                    p.fill_(float("inf"))
        return step(self, batch, batch_idx)

    monkeypatch.setattr(CaptionTask, "training_step", exploding)
    with pytest.raises(NonFiniteStop, match=r"3 steps in a row were not finite \(the last: step 7"):
        train(compose_config([*args, "trainer.max_steps=12", "run.max_nonfinite_steps=3"]))
    for name in ("last.ckpt", "last.prev.ckpt", "best.ckpt"):
        tensors = checkpoint_tensors(ckpts / name)
        assert nonfinite_tensors(tensors) == [], name
    # The validation at step 6 saw infinite weights: last.ckpt still holds the state before them.
    assert all(torch.equal(t, good[name]) for name, t in checkpoint_tensors(ckpts / "last.ckpt"))
    assert not list(ckpts.glob("*.partial")) and not list(ckpts.glob("*.tmp"))


def test_a_stop_signal_ends_the_segment_with_the_resume_command(run, monkeypatch):
    # The exit code (3) of this path is checked from the command line in tests/test_preemption.py.
    run_dir, args = run
    step = CaptionTask.training_step

    def signalled(self, batch, batch_idx):
        if self.global_step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # as `scancel` would; the Preemption handler catches it
        return step(self, batch, batch_idx)

    monkeypatch.setattr(CaptionTask, "training_step", signalled)
    monkeypatch.setattr(sys, "argv", ["xmodal-train", "logger=csv", "run.id=R"])
    with pytest.raises(RunStopped) as stopped:
        train(compose_config([*args, "trainer.max_steps=20"]))
    assert str(stopped.value) == (
        f"stopped by SIGTERM at step 6 (checkpoint saved); resume with: cd {shlex.quote(os.getcwd())} "
        "&& xmodal-train logger=csv run.id=R"
    )
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["preempted"] is True and summary["global_step"] == 6 and summary["nonfinite_steps"] == 0
    report = json.loads((run_dir / "summary.json").read_text())
    assert (report["status"], report["stop_reason"], report["steps"]) == ("stopped", "SIGTERM", 6)
    assert report["commands"]["resume"] == str(stopped.value).split("resume with: ")[1]
    assert f"  resume:         {report['commands']['resume']}" in (run_dir / "summary.txt").read_text()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
