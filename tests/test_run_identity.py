"""Run identity: one id and dir per job, shared by ranks and requeues; never shared by two jobs."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import run_cli
from xmodal.config import ConfigError, compose_config
from xmodal.run import RUN_ID_ENV, decide_run, resume_checkpoint
from xmodal.train import train

JOB_ENV = (
    "SLURM_JOB_ID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_PROCID",
    "RANK",
    "LOCAL_RANK",
    "NODE_RANK",
    RUN_ID_ENV,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in JOB_ENV:
        monkeypatch.delenv(var, raising=False)


def test_back_to_back_fresh_ids_never_share_a_dir(tmp_path):
    runs = [decide_run(None, tmp_path, "exp") for _ in range(200)]
    assert len({r.id for r in runs}) == 200
    assert len({r.dir for r in runs}) == 200
    assert all(r.fresh and r.dir.parent == tmp_path / "exp" for r in runs)


def test_slurm_job_and_array_ids_are_stable_across_requeues(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    first = decide_run(None, tmp_path, "exp")
    requeued = decide_run(None, tmp_path, "exp")
    assert (first.id, first.fresh) == ("4242", True)
    assert (requeued.id, requeued.dir, requeued.fresh) == ("4242", first.dir, False)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert decide_run(None, tmp_path, "exp").id == "77_3"


def test_ranks_started_by_the_launcher_join_its_run(tmp_path, monkeypatch):
    launcher = decide_run(None, tmp_path, "exp")
    monkeypatch.setenv(RUN_ID_ENV, launcher.id)
    # The launcher itself ignores a stale id in its environment (e.g. left by a previous job) ...
    assert decide_run(None, tmp_path, "exp").id != launcher.id
    # ... while a rank it started (LOCAL_RANK=1 in the copied environment) joins it.
    monkeypatch.setenv("LOCAL_RANK", "1")
    child = decide_run(None, tmp_path, "exp")
    assert (child.id, child.dir, child.fresh) == (launcher.id, launcher.dir, False)


def test_cli_run_id_wins_and_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert decide_run("mine", tmp_path, "exp").id == "mine"
    with pytest.raises(ConfigError, match=r"run.id: must be 1-128 characters"):
        decide_run("../escape", tmp_path, "exp")


def test_two_runs_get_two_dirs_and_a_given_id_resumes_in_its_dir(tiny, tmp_path):
    steps = ["trainer.max_steps=4", "trainer.val_check_interval=2", "logger=csv", "test_after_fit=false"]
    train(compose_config([*tiny, *steps]))
    train(compose_config([*tiny, *steps]))
    runs = sorted((tmp_path / "outputs" / "shapes_caption").iterdir())
    assert len(runs) == 2

    train(compose_config([*tiny, *steps, "run.id=X"]))
    run_dir = tmp_path / "outputs" / "shapes_caption" / "X"
    first = json.loads((run_dir / "metrics.json").read_text())
    assert first["global_step"] == 4
    # Same id again with a longer budget: continues from checkpoints/last.ckpt in the same dir.
    resumed = train(compose_config([*tiny, *steps[1:], "trainer.max_steps=8", "run.id=X"]))
    second = json.loads((run_dir / "metrics.json").read_text())
    assert second["global_step"] == 8 and second["run_id"] == "X"
    assert "val/bleu4" in resumed
    assert len(sorted((tmp_path / "outputs" / "shapes_caption").iterdir())) == 3
    assert (run_dir / "cmd.txt").read_text().count("# ") == 2  # one entry per (re)start
    steps_logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == [2, 4, 6, 8]  # the resumed run went on from step 4, not from 0


def test_multirun_gives_one_run_dir_per_job_and_one_sweep_dir(tiny, tmp_path):
    result = run_cli(
        [
            "xmodal-train",
            "-m",
            *tiny,
            "logger=wandb",
            "trainer.max_steps=2",
            "test_after_fit=false",
            "seed=1,2",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    experiment_dir = tmp_path / "outputs" / "shapes_caption"
    runs = sorted(p for p in experiment_dir.iterdir() if p.name != "multirun")
    sweeps = list((experiment_dir / "multirun").iterdir())
    assert len(runs) == 2 and len(sweeps) == 1
    pointers = sorted((sweeps[0] / str(job) / "run_dir.txt").read_text().strip() for job in (0, 1))
    assert pointers == [str(r) for r in runs]
    assert sorted(OmegaConf.load(r / "config.yaml").seed for r in runs) == [1, 2]
    # The sweep summary (xmodal/sweep.py): a row per job, in job order, with its point and run dir.
    with open(sweeps[0] / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["job"], r["seed"], r["status"]) for r in table] == [
        ("0", "1", "finished"),
        ("1", "2", "finished"),
    ]
    assert [r["run_dir"] for r in table] == [
        (sweeps[0] / j / "run_dir.txt").read_text().strip() for j in "01"
    ]
    assert "best val/cider" in table[0] and f"sweep summary (2 jobs): {sweeps[0]}" in result.stdout
    # Readable aliases of the run dirs, named by what differs between the jobs.
    aliases = sorted((sweeps[0] / "runs").iterdir())
    assert [a.name for a in aliases] == ["0_seed=1", "1_seed=2"]
    assert [a.resolve() for a in aliases] == [Path(r["run_dir"]).resolve() for r in table]
    # One offline W&B run per job, each under its own run dir, with its own id.
    wandb_runs = [list((r / "wandb").glob("offline-run-*")) for r in runs]
    assert [len(w) for w in wandb_runs] == [1, 1]
    assert wandb_runs[0][0].name.rsplit("-", 1)[-1] != wandb_runs[1][0].name.rsplit("-", 1)[-1]
    # Both jobs are grouped under the sweep's name (W&B group = sweep dir). The offline run file is
    # W&B's binary record log; the run record holds the group as a plain UTF-8 string.
    for (run_file,) in ([next(w.glob("*.wandb"))] for w in (wandb_runs[0][0], wandb_runs[1][0])):
        assert sweeps[0].name.encode() in run_file.read_bytes()


def test_local_multirun_with_several_devices_is_refused_at_once(tiny, tmp_path):
    result = run_cli(["xmodal-train", "-m", *tiny, "logger=none", "trainer=ddp_cpu", "seed=1,2"], tmp_path)
    assert result.returncode == 2
    assert "trainer.devices: a local multirun (-m) cannot start multi-process jobs" in result.stderr
    assert not list(tmp_path.glob("outputs/shapes_caption/2*"))  # no run dir was made


def test_resume_picks_the_newest_of_last_and_slurm_hpc_checkpoints(tmp_path):
    assert resume_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(b"x")
    assert resume_checkpoint(tmp_path) == last
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"x")
    os.utime(hpc, ns=(last.stat().st_mtime_ns + 10**9,) * 2)
    assert resume_checkpoint(tmp_path) == hpc
