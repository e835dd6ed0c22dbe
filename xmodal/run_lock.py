"""One job per run dir: ``run.lock`` names its holder and an OS lock on it proves the holder alive.

The launching process takes an exclusive ``flock`` on ``<run dir>/run.lock`` and keeps the file
open until the run ends; the kernel drops the lock when the process dies, however it dies, so a
lock left behind by a crashed or killed job is simply free again ("stale"), whatever the file
says. The file's content (host, PID, SLURM job id, start time) only serves the refusal message.

A requeued SLURM job keeps its job id: when the holder recorded in the file is the same SLURM job,
it is this job's earlier incarnation, still being torn down (or a lock a dead node never gave
back on a network file system), and this start takes over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from xmodal.run import slurm_run_id

log = logging.getLogger("xmodal")

LOCK_NAME = "run.lock"


class RunBusy(Exception):
    """The run dir is held by another live job (a one-line user error)."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    slurm_job: str | None
    started: str

    @staticmethod
    def me() -> Holder:
        return Holder(
            socket.gethostname(), os.getpid(), slurm_run_id(), datetime.now().isoformat("T", "seconds")
        )

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"pid {self.pid} on {self.host}{job}, since {self.started}"


def read_holder(path: Path) -> Holder | None:
    try:
        data = json.loads(path.read_text())
        return Holder(str(data["host"]), int(data["pid"]), data.get("slurm_job"), str(data["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RunLock:
    """Held by the process that created it until :meth:`release` (or the process's end)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the run dir, or raise :class:`RunBusy` naming the job that holds it."""
        me = Holder.me()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = _try_flock(fd, self.path)
        except BaseException:
            os.close(fd)
            raise
        previous = read_holder(self.path)
        if not locked:
            if previous is None or previous.slurm_job is None or previous.slurm_job != me.slurm_job:
                os.close(fd)
                holder = previous.describe() if previous else "a process whose lock file is unreadable"
                raise RunBusy(
                    f"run dir {self.path.parent} is in use by {holder}: a second start of the same "
                    "run.id would share its files; wait for that job to end, or start a new run.id"
                )
            log.warning(
                "taking over run dir %s from this SLURM job's earlier start (%s)",
                self.path.parent,
                previous.describe(),
            )
        elif previous is not None and previous.pid != me.pid:
            log.info(
                "run dir %s: the lock of %s is stale (that process is gone); taking over",
                self.path.parent,
                previous.describe(),
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(asdict(me)) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let the run dir go. The file is emptied first: one still naming a holder whose lock is
        free was left by a process that died holding it."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)  # closing the last descriptor of the open file drops the flock


_NO_FLOCK = {errno.ENOLCK, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}


def _try_flock(fd: int, path: Path) -> bool:
    """True when this process now holds the lock, False when another one does."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno not in _NO_FLOCK:
            raise
        # e.g. Lustre mounted without -o flock: no OS lock here; the file still names the holder.
        log.warning("the file system of %s has no flock (%s): the run dir is not locked", path, err.strerror)
    return True
