"""SLURM preemption: SIGUSR2 mid-epoch → checkpoint + requeue → the rerun ends like an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli

SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "xmodal",
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_NNODES": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
}


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def slurm_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A SLURM-like environment whose `scontrol` records its arguments into the returned file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    (bin_dir / "scontrol").chmod(0o755)
    return {**os.environ, **SLURM, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, record


def train_until_signalled(args: list[str], env: dict[str, str], cwd: Path, run_dir: Path, sig: int) -> None:
    """Start xmodal-train, send ``sig`` after its first validation, and wait for its exit: 3, a stop
    after saving (README "When things go wrong")."""
    job = subprocess.Popen(
        ["xmodal-train", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").exists(), 180, "the first validation")
        job.send_signal(sig)
        output, _ = job.communicate(timeout=180)
    finally:
        job.kill()
    assert job.returncode == 3, output[-3000:]


def test_requeue_signal_saves_requeues_and_the_rerun_matches_an_uninterrupted_run(tiny, tmp_path):
    env, record = slurm_env(tmp_path)
    args = [*tiny, "logger=wandb", "trainer.max_steps=30", "trainer.val_check_interval=6"]
    args += ["callbacks.rank_checksums=true", "test_after_fit=false"]
    run_dir = tmp_path / "outputs" / "shapes_caption" / "4242"  # the SLURM job id is the run id

    train_until_signalled(args, env, tmp_path, run_dir, signal.SIGUSR2)
    first = json.loads((run_dir / "metrics.json").read_text())
    assert first["preempted"] is True and 6 <= first["global_step"] < 30
    assert record.read_text().split() == ["requeue", "4242"]
    wandb_id = (run_dir / "wandb_id.txt").read_text().strip()

    # The requeued job: same command, same SLURM job id.
    rerun = subprocess.run(
        ["xmodal-train", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    second = json.loads((run_dir / "metrics.json").read_text())
    assert second["preempted"] is False and second["global_step"] == 30
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [6, 12, 18, 24, 30]  # went on from the saved step, no validation lost or repeated
    assert (run_dir / "wandb_id.txt").read_text().strip() == wandb_id
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(wandb_id) for name in runs)  # one W&B run, resumed

    reference = run_cli(["xmodal-train", *args, "logger=none", "run.id=reference"], tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    digest = json.loads((run_dir / "checksums" / "rank0.json").read_text())["end"]
    uninterrupted = tmp_path / "outputs" / "shapes_caption" / "reference" / "checksums" / "rank0.json"
    assert digest == json.loads(uninterrupted.read_text())["end"]  # bit-identical final weights
    assert Path(run_dir / "checkpoints" / "last.ckpt").is_file()


def test_sigterm_saves_and_stops_without_requeue(tiny, tmp_path):
    env, record = slurm_env(tmp_path)
    args = [
        *tiny,
        "logger=none",
        "trainer.max_steps=30",
        "trainer.val_check_interval=6",
        "test_after_fit=false",
    ]
    run_dir = tmp_path / "outputs" / "shapes_caption" / "4242"
    train_until_signalled(args, env, tmp_path, run_dir, signal.SIGTERM)
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["preempted"] is True and 6 <= summary["global_step"] < 30
    assert not record.exists()  # stopped, not requeued
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_an_interrupted_checkpoint_write_leaves_the_previous_one_usable(tmp_path):
    """kill -9 in the middle of writing last.ckpt: only the temporary file is partial."""
    import torch

    from xmodal.callbacks.last_checkpoint import LastCheckpoint

    class Strategy:
        def barrier(self, name: str) -> None:
            pass

    class Trainer:
        fast_dev_run = sanity_checking = False
        is_global_zero = True
        strategy = Strategy()

        def __init__(self, step: int, crash: bool):
            self.global_step, self.crash = step, crash

        def save_checkpoint(self, path: Path, weights_only: bool = False) -> None:  # Trainer's signature
            if self.crash:
                Path(path).write_bytes(b"partial")  # the process dies here
                raise SystemExit("killed")
            torch.save({"global_step": self.global_step}, path)

    path = tmp_path / "checkpoints" / "last.ckpt"
    path.parent.mkdir()
    callback = LastCheckpoint(path)
    callback.save(Trainer(step=5, crash=False))
    with pytest.raises(SystemExit):
        callback.save(Trainer(step=6, crash=True))
    assert torch.load(path)["global_step"] == 5  # the previous checkpoint still loads
    callback.save(Trainer(step=7, crash=False))  # and the next save replaces the stale temporary
    assert torch.load(path)["global_step"] == 7 and not path.with_name("last.ckpt.tmp").exists()


def test_a_signal_to_one_rank_stops_both_at_the_same_step_and_the_rerun_finishes(tiny, tmp_path):
    """2 DDP ranks (gloo): only the launcher (rank 0) gets SIGUSR2; the ranks agree at the next
    batch end, both save nothing but one checkpoint and stop; rerunning the id goes on to the end."""
    args = [*tiny, "trainer=ddp_cpu", "logger=none", "trainer.max_steps=24", "trainer.val_check_interval=6"]
    args += ["callbacks.rank_checksums=true", "test_after_fit=false", "run.id=two"]
    run_dir = tmp_path / "outputs" / "shapes_caption" / "two"
    train_until_signalled(args, dict(os.environ), tmp_path, run_dir, signal.SIGUSR2)
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["preempted"] is True and 6 <= summary["global_step"] < 24
    ranks = [json.loads((run_dir / "checksums" / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Rank 1 never saw the signal, yet stopped at the same step with the same weights.
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == summary["global_step"]
    assert ranks[0]["end"] == ranks[1]["end"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()

    rerun = run_cli(["xmodal-train", *args], tmp_path)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 24
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [6, 12, 18, 24]


KILLED_WRITER = """
import sys, time, torch
from pathlib import Path
from xmodal.callbacks.last_checkpoint import LastCheckpoint

class Strategy:
    def barrier(self, name):
        pass

class Trainer:
    fast_dev_run = sanity_checking = False
    is_global_zero = True
    strategy = Strategy()

    def __init__(self, step, slow):
        self.global_step, self.slow = step, slow

    def save_checkpoint(self, path, weights_only=False):  # Trainer's signature
        if not self.slow:
            torch.save({"global_step": self.global_step}, path)
            return
        with open(path, "wb") as f:  # a large checkpoint, written in pieces
            f.write(b"x" * (1 << 20))
            f.flush()
            Path(sys.argv[2]).write_text("writing")
            time.sleep(60)  # SIGKILLed here, in the middle of the write

callback = LastCheckpoint(Path(sys.argv[1]))
callback.save(Trainer(5, slow=False))
callback.save(Trainer(6, slow=True))
"""


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    import sys

    import torch

    path = tmp_path / "checkpoints" / "last.ckpt"
    path.parent.mkdir()
    marker = tmp_path / "writing.txt"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path), str(marker)])
    try:
        wait_for(marker.exists, 60, "the second checkpoint write to start")
        writer.send_signal(signal.SIGKILL)
        assert writer.wait(timeout=30) == -signal.SIGKILL
    finally:
        writer.kill()
    assert torch.load(path)["global_step"] == 5  # the partial write never replaced last.ckpt


def test_the_requeue_waits_until_wandb_is_finished(tiny, tmp_path, monkeypatch):
    """In process: a requeue signal at the first step under a fake SLURM, logger=wandb (offline).
    When ``train`` ends (raising RunStopped), W&B is finished and ``scontrol`` not yet called;
    the requeue is left to the caller's last act (xmodal/train.py ``_hydra_main``). On main it
    ran at the checkpoint, and SLURM's SIGTERM then killed W&B's service mid-run."""
    import wandb

    from xmodal.callbacks.preemption import Preemption
    from xmodal.config import compose_config
    from xmodal.train import RunStopped, train

    env, record = slurm_env(tmp_path)
    for name in [*SLURM, "PATH"]:
        monkeypatch.setenv(name, env[name])
    start = Preemption.on_train_start

    def signalled_at_start(self, trainer, pl_module):
        start(self, trainer, pl_module)
        self.requested = signal.SIGUSR2  # as if SLURM sent it: the first batch end stops

    monkeypatch.setattr(Preemption, "on_train_start", signalled_at_start)
    finished = []
    finish = wandb.finish
    monkeypatch.setattr(wandb, "finish", lambda **kw: (finished.append(record.exists()), finish(**kw)))
    cfg = compose_config([*tiny, "logger=wandb", "trainer.max_steps=8", "trainer.num_sanity_val_steps=0"])

    with pytest.raises(RunStopped) as stopped:
        train(cfg)
    assert finished == [False] and wandb.run is None  # finished, before any requeue
    assert not record.exists()
    assert "SLURM requeues the job, it resumes by itself" in str(stopped.value)
    run_dir = tmp_path / "outputs" / "shapes_caption" / "4242"
    assert json.loads((run_dir / "metrics.json").read_text())["preempted"] is True
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()

    assert stopped.value.preemption.requeue() is True  # what _hydra_main does after printing
    assert record.read_text().split() == ["requeue", "4242"]
    assert stopped.value.preemption.requeue() is False  # once only
    assert record.read_text().split() == ["requeue", "4242"]
