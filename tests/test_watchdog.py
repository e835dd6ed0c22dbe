"""The rank watchdog: a killed or frozen rank is named with where it was, stacks are dumped, and
the job ends with a documented exit code instead of dying mute or hanging in a collective."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from xmodal.callbacks.watchdog import EXIT_PEER_LOST, EXIT_STALLED, RankWatchdog, describe_exit
from xmodal.files import write_json_atomic


class Aborted(Exception):
    pass


def raise_aborted(code: int) -> None:
    raise Aborted(code)


def watchdog(tmp_path: Path, **kwargs) -> RankWatchdog:
    dog = RankWatchdog(tmp_path, peer_timeout_s=5, stall_timeout_s=30, abort=raise_aborted, **kwargs)
    (tmp_path / "ranks").mkdir()
    dog.rank, dog.world_size = 0, 2
    return dog


def test_exit_codes_are_described_by_signal_name():
    assert describe_exit(-9) == "was killed by signal 9 (SIGKILL)"
    assert describe_exit(1) == "exited with code 1"


def test_a_peer_with_a_stale_heartbeat_is_named_with_its_last_step_sample_and_shard(tmp_path):
    dog = watchdog(tmp_path)
    now = time.time()
    dog._started_wall = now - 60
    beat = {"rank": 1, "host": "node7", "pid": 4242, "step": 37, "phase": "train"}
    beat |= {"key": "shapes-000123", "shard": "train/shard-000003.tar", "time": now - 12}
    write_json_atomic(tmp_path / "ranks" / "rank1.json", beat)
    code, reason = dog.check_peers(now)
    assert code == EXIT_PEER_LOST
    assert reason == (
        "rank 1 stopped answering (no heartbeat for 12 s, run.peer_timeout_s=5); last seen 12 s ago "
        "at step 37 (train, sample 'shapes-000123' of train/shard-000003.tar; host node7, pid 4242)"
    )
    write_json_atomic(tmp_path / "ranks" / "rank1.json", {**beat, "time": now - 2})
    assert dog.check_peers(now) is None  # fresh enough
    # A heartbeat left by an earlier segment of the run counts from this segment's start.
    write_json_atomic(tmp_path / "ranks" / "rank1.json", {**beat, "time": now - 3600})
    dog._started_wall = now - 1
    assert dog.check_peers(now) is None


def test_a_rank_other_than_zero_watches_rank_zero_only_and_never_declares_an_unseen_peer_dead(
    tmp_path, caplog
):
    dog = watchdog(tmp_path)
    dog.rank, dog.world_size, dog._started_wall = 2, 4, time.time() - 100
    # No rank0.json after 100 s (a run dir on node-local disks): one warning, no verdict.
    assert dog.check_peers(time.time()) is None and dog.check_peers(time.time()) is None
    warned = [r.getMessage() for r in caplog.records if "no heartbeat of rank 0" in r.getMessage()]
    assert len(warned) == 1 and "is the run dir shared between the nodes?" in warned[0]
    beat = {"rank": 0, "host": "n1", "pid": 7, "step": 3, "phase": "train", "time": time.time()}
    write_json_atomic(tmp_path / "ranks" / "rank0.json", beat)
    assert dog.check_peers(time.time()) is None  # seen alive now
    (tmp_path / "ranks" / "rank0.json").unlink()  # gone afterwards: its last beat still counts
    code, reason = dog.check_peers(time.time() + 9)
    assert code == EXIT_PEER_LOST and reason.startswith("rank 0 stopped answering (no heartbeat for 9 s")
    assert reason.endswith("at step 3 (train; host n1, pid 7)")


def test_a_stalled_rank_dumps_its_stacks_then_aborts_with_the_stall_code(tmp_path):
    dog = watchdog(tmp_path)
    dog._progress = (time.monotonic() - 45, 12, "validation", None, None)
    code, reason = dog.check_stall(time.monotonic())
    assert code == EXIT_STALLED
    assert reason.startswith(
        "rank 0 made no progress for 45 s (run.stall_timeout_s=30) at step 12 (validation)"
    )
    with pytest.raises(Aborted) as aborted:
        dog.fail(code, reason)
    assert aborted.value.args == (EXIT_STALLED,)
    stacks = (tmp_path / "stacks" / "rank0.txt").read_text()
    assert stacks.startswith(f"# rank 0, pid {os.getpid()}: rank 0 made no progress")
    assert "test_a_stalled_rank_dumps_its_stacks" in stacks  # this thread's frames, by faulthandler
    dog.fail(code, reason)  # a second report (thread and on_exception racing) does nothing


def test_a_launched_rank_notices_its_parent_is_gone(tmp_path):
    dog = watchdog(tmp_path)
    dog.rank, dog._parent_pid = 1, os.getppid()
    assert dog.check_parent() is None
    dog._parent_pid = -1  # not our parent any more: we were re-parented
    code, reason = dog.check_parent()
    assert code == EXIT_PEER_LOST and reason.startswith("rank 0 (pid -1) is gone; ")


def test_bad_timeouts_are_refused_naming_the_key(tiny, tmp_path):
    from xmodal.config import ConfigError, compose_config, validate

    with pytest.raises(ConfigError, match=r"run.peer_timeout_s: must be >= 0 seconds, 0 = off \(got -1.0\)"):
        validate(compose_config([*tiny, "run.peer_timeout_s=-1"]))
    with pytest.raises(ConfigError, match=r"run.stall_timeout_s: must be >= 0 seconds, 0 = off \(got nan\)"):
        validate(compose_config([*tiny, "run.stall_timeout_s=nan"]))


def wait_for_beat(path: Path, process: subprocess.Popen, min_step: int, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0][-3000:]
        try:
            beat = json.loads(path.read_text())
            if beat["step"] >= min_step and beat["phase"] == "train":
                return beat
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"no heartbeat at step >= {min_step} in {path}")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_a_killed_or_frozen_ddp_rank_is_named_and_the_job_ends_with_code_6(tiny, tmp_path, fault):
    args = [
        *tiny,
        "trainer=ddp_cpu",
        "logger=none",
        "trainer.max_steps=2000",
        "trainer.val_check_interval=1000",
    ]
    args += ["test_after_fit=false", "run.peer_timeout_s=5", "run.id=w"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    job = subprocess.Popen(
        ["xmodal-train", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run_dir = tmp_path / "outputs" / "shapes_caption" / "w"
    beat = wait_for_beat(run_dir / "ranks" / "rank1.json", job, min_step=2)
    os.kill(beat["pid"], signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
    try:
        output, _ = job.communicate(timeout=120)
    finally:
        if fault == "freeze":
            with contextlib.suppress(ProcessLookupError):
                os.kill(beat["pid"], signal.SIGKILL)  # rank 0 kills it; in case it did not
    assert job.returncode == EXIT_PEER_LOST, output[-3000:]
    if fault == "kill":
        expected = f"rank 1 (pid {beat['pid']}) was killed by signal 9 (SIGKILL); last seen "
    else:
        expected = "rank 1 stopped answering (no heartbeat for "
    assert expected in output, output[-3000:]
    stacks = run_dir / "stacks" / "rank0.txt"
    assert f"Rank 0 stops; stacks of rank 0 in {stacks}" in output
    assert "Thread" in stacks.read_text()  # faulthandler's dump of every thread of rank 0
    assert "Traceback" not in output  # the reason, not a stack trace, on the console
