"""Rank watchdog: say which rank died or stalled, and where, instead of hanging or dying mute.

Without it, a DDP rank that dies takes the job down without a word about which one: Lightning's
child-process observer SIGKILLs every process (the survivors print nothing of their own), and a
rank that freezes (SIGSTOP, a wedged NFS read, a deadlocked loader) leaves its peers blocked inside
a collective until the process-group timeout, 30 minutes by default, with no stack to look at.

Every rank runs one daemon thread that:

- writes its **heartbeat** ``<run dir>/ranks/rank<R>.json`` (host, pid, step, phase, last sample
  key and shard, wall time) every ``peer_timeout_s / 10`` seconds; the training thread only updates
  a tuple in memory at batch and checkpoint boundaries (no I/O on the step path);
- **watches its peers**: rank zero reads every peer's heartbeat, the others read rank zero's (O(world)
  reads, not O(world²), on a shared filesystem); a heartbeat older than ``peer_timeout_s`` means the
  rank is gone or frozen (a peer never seen, as with a run dir on node-local disks, is warned
  about once and never taken for dead). The launcher of a local multi-rank run also polls its child processes
  (faster than Lightning's 5 s observer) and a launched child notices its parent is gone;
- **watches itself**: no step, batch or checkpoint boundary for ``stall_timeout_s`` means this rank
  is stuck (usually in a collective waiting for a peer, or in its own data loader).

On either, it writes its threads' stacks to ``<run dir>/stacks/rank<R>.txt`` (``faulthandler``),
logs one line naming the rank at fault with its last step, phase, sample key and shard, stops the
processes it launched and exits the process with ``EXIT_PEER_LOST`` (6) or ``EXIT_STALLED`` (7):
the job ends now, with the reason, instead of hours later or never.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import LightningEnvironment

from xmodal.files import write_json_atomic

log = logging.getLogger("xmodal")

EXIT_PEER_LOST = 6
"""A rank died or stopped answering; the others stopped (README "Exit codes")."""
EXIT_STALLED = 7
"""A rank made no progress for ``run.stall_timeout_s``; every rank stopped."""


def slow_lightning_observer(period_s: float = 3600.0) -> None:
    """Make Lightning's child-process observer poll rarely: it SIGKILLs every process within 5 s
    of a child's death, often before this watchdog (polling 4x a second) has said which rank died.
    Its private attribute is looked up defensively: without it the old race stays, nothing breaks.
    The watchdog kills the launched ranks itself (:meth:`RankWatchdog.fail`)."""
    for thread in threading.enumerate():
        if thread.name == "child-process-observer" and hasattr(thread, "_sleep_period"):
            thread._sleep_period = period_s


def describe_exit(returncode: int) -> str:
    """``"exited with code 1"`` / ``"was killed by signal 9 (SIGKILL)"`` for a Popen return code."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = "unknown"
    return f"was killed by signal {-returncode} ({name})"


def describe_beat(beat: dict[str, Any] | None, now: float) -> str:
    """Where a rank was at its last heartbeat: step, phase, sample, shard and how long ago."""
    if not beat:
        return "no heartbeat written"
    where = f"last seen {now - float(beat.get('time', now)):.0f} s ago at step {beat.get('step')}"
    where += f" ({beat.get('phase')}"
    if beat.get("key") is not None:
        where += f", sample {beat['key']!r}"
    if beat.get("shard"):
        where += f" of {beat['shard']}"
    return where + f"; host {beat.get('host')}, pid {beat.get('pid')})"


class RankWatchdog(L.Callback):
    """Heartbeat, peer and stall watch of one rank (module docstring). ``abort`` is called with the
    exit code once the report is written (``os._exit``; tests inject their own)."""

    def __init__(
        self,
        run_dir: Path,
        peer_timeout_s: float,
        stall_timeout_s: float,
        abort: Callable[[int], None] = os._exit,
    ):
        self.ranks_dir = Path(run_dir) / "ranks"
        self.stacks_dir = Path(run_dir) / "stacks"
        self.peer_timeout_s = peer_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.beat_interval_s = max(0.2, peer_timeout_s / 10) if peer_timeout_s > 0 else 5.0
        self.abort = abort
        self.rank, self.world_size = 0, 1
        self._children: list[Any] = []
        self._parent_pid: int | None = None
        # (monotonic time, step, phase, key, shard) of the training thread's last boundary.
        self._progress: tuple[float, int, str, Any, Any] = (time.monotonic(), 0, "setup", None, None)
        self._stop = threading.Event()
        self._failing = threading.Lock()
        self._last_beats: dict[int, dict[str, Any]] = {}  # each peer's newest heartbeat of this segment
        self._unseen_warned: set[int] = set()
        self._failed = False
        self._thread: threading.Thread | None = None
        self._started_wall = time.time()

    # ------------------------------------------------------------ the training thread's side
    def _mark(self, trainer: L.Trainer, phase: str, batch: Any = None) -> None:
        key = shard = None
        if isinstance(batch, dict):
            keys, shards = batch.get("__key__"), batch.get("__shard__")
            key = keys[0] if isinstance(keys, list) and keys else None
            shard = shards[0] if isinstance(shards, list) and shards else None
        self._progress = (time.monotonic(), int(trainer.global_step), phase, key, shard)

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        self.rank, self.world_size = trainer.global_rank, trainer.world_size
        launcher = getattr(trainer.strategy, "launcher", None)
        self._children = list(getattr(launcher, "procs", None) or [])
        # A rank > 0 under LightningEnvironment was started by rank zero's subprocess launcher
        # (torchrun and SLURM have environments of their own): its parent is rank zero.
        env = getattr(trainer.strategy, "cluster_environment", None)
        launched_by_rank_zero = isinstance(env, LightningEnvironment) and trainer.local_rank > 0
        self._parent_pid = os.getppid() if launched_by_rank_zero else None
        if self._children:
            slow_lightning_observer()
        self._mark(trainer, stage)
        self._stop.clear()
        if self._thread is None or not self._thread.is_alive():
            self._started_wall = time.time()
            self._last_beats, self._unseen_warned = {}, set()  # peers are watched afresh per stage
            self._thread = threading.Thread(target=self._run, name="xmodal-watchdog", daemon=True)
            self._thread.start()

    def teardown(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread = None
        if self._children:
            slow_lightning_observer(5.0)  # its own period: nothing else watches the children now

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._mark(trainer, "train", batch)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._mark(trainer, "train", batch)

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._mark(trainer, "validation", batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._mark(trainer, "validation end")

    def on_test_batch_start(
        self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._mark(trainer, "test", batch)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self._mark(trainer, "checkpoint")

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        # A peer's death often reaches this rank first as an error inside a collective (the socket
        # closed), before the watchdog thread's next poll: report the dead rank, not the symptom.
        # The kernel closes a dead process's sockets just before it reparents its children, so a
        # parent's death may take a moment to show in getppid().
        if not (self._children or self._parent_pid):
            return
        deadline = time.monotonic() + 1.0
        while (problem := self.check_children() or self.check_parent()) is None:
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        self.fail(*problem)

    # ------------------------------------------------------------ the watchdog thread's side
    def beat(self) -> dict[str, Any]:
        """This rank's heartbeat record (what ``ranks/rank<R>.json`` holds)."""
        at, step, phase, key, shard = self._progress
        return {
            "rank": self.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "step": step,
            "phase": phase,
            "key": key,
            "shard": shard,
            "idle_s": round(time.monotonic() - at, 1),
            "time": time.time(),
        }

    def read_beat(self, rank: int) -> dict[str, Any] | None:
        try:
            return json.loads((self.ranks_dir / f"rank{rank}.json").read_text())
        except (OSError, ValueError):
            return None

    def _run(self) -> None:
        self.write_beat()
        next_beat = time.monotonic() + self.beat_interval_s
        # Children and the parent are polled 4x a second (cheap, local); heartbeats are written and
        # read once per beat interval (a shared filesystem sees O(world) small files per interval).
        while not self._stop.wait(min(self.beat_interval_s, 0.25)):
            problem = self.check_children() or self.check_parent()
            if problem is None and time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.beat_interval_s
                self.write_beat()
                problem = self.check_peers(time.time()) or self.check_stall(time.monotonic())
            if problem is not None:
                self.fail(*problem)
                return

    def write_beat(self) -> None:
        try:
            self.ranks_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.ranks_dir / f"rank{self.rank}.json", self.beat())
        except OSError:
            pass  # a full or flaky disk must not end the run from here

    def check_children(self) -> tuple[int, str] | None:
        """A child rank this process launched that has exited non-zero."""
        for local_rank, proc in enumerate(self._children, start=1):
            code = proc.poll()
            if code not in (None, 0):
                rank = self.rank + local_rank
                return EXIT_PEER_LOST, (
                    f"rank {rank} (pid {proc.pid}) {describe_exit(code)}; "
                    f"{describe_beat(self.read_beat(rank), time.time())}"
                )
        return None

    def check_parent(self) -> tuple[int, str] | None:
        """The launching rank of a local run is gone (this process was re-parented)."""
        if self._parent_pid is None or os.getppid() == self._parent_pid:
            return None
        return EXIT_PEER_LOST, (
            f"rank 0 (pid {self._parent_pid}) is gone; {describe_beat(self.read_beat(0), time.time())}"
        )

    def check_peers(self, now: float) -> tuple[int, str] | None:
        """A peer whose heartbeat went older than ``peer_timeout_s`` (rank zero watches all, the
        others rank zero). Only a peer seen alive in this segment can be declared lost: one whose
        file never appears (a run dir on node-local disk, not shared between nodes) is warned about
        once and left to the stall check, never taken for dead."""
        if self.peer_timeout_s <= 0 or self.world_size < 2:
            return None
        peers = range(1, self.world_size) if self.rank == 0 else [0]
        for peer in peers:
            beat = self.read_beat(peer)
            if beat and float(beat["time"]) >= self._started_wall - 1:
                self._last_beats[peer] = beat  # a file left by an earlier segment does not count
            beat = self._last_beats.get(peer)
            if beat is None:
                if now - self._started_wall > self.peer_timeout_s and peer not in self._unseen_warned:
                    self._unseen_warned.add(peer)
                    log.warning(
                        "no heartbeat of rank %d in %s after %.0f s: is the run dir shared between the "
                        "nodes? Its peer watch is off; a stall is still caught (run.stall_timeout_s)",
                        peer,
                        self.ranks_dir,
                        now - self._started_wall,
                    )
                continue
            last = float(beat["time"])
            if now - last > self.peer_timeout_s:
                return EXIT_PEER_LOST, (
                    f"rank {peer} stopped answering (no heartbeat for {now - last:.0f} s, "
                    f"run.peer_timeout_s={self.peer_timeout_s:g}); {describe_beat(beat, now)}"
                )
        return None

    def check_stall(self, now: float) -> tuple[int, str] | None:
        at, step, phase, _, _ = self._progress
        if self.stall_timeout_s <= 0 or now - at <= self.stall_timeout_s:
            return None
        return EXIT_STALLED, (
            f"rank {self.rank} made no progress for {now - at:.0f} s "
            f"(run.stall_timeout_s={self.stall_timeout_s:g}) at step {step} ({phase})"
        )

    def fail(self, code: int, reason: str) -> None:
        """Dump this rank's stacks, report ``reason``, stop the launched ranks, then ``abort``."""
        with self._failing:  # the watchdog thread and on_exception may both get here
            if self._failed:
                return
            self._failed = True
        stacks = self.stacks_dir / f"rank{self.rank}.txt"
        try:
            stacks.parent.mkdir(parents=True, exist_ok=True)
            with open(stacks, "w") as out:
                out.write(f"# rank {self.rank}, pid {os.getpid()}: {reason}\n")
                out.flush()
                faulthandler.dump_traceback(file=out, all_threads=True)
        except OSError:
            stacks = None  # type: ignore[assignment]
        where = f"; stacks of rank {self.rank} in {stacks}" if stacks else ""
        message = f"{reason}. Rank {self.rank} stops{where}"
        if log.hasHandlers():
            log.error("%s", message)
            for handler in log.handlers:
                handler.flush()
        else:
            print(f"error: {message}", file=sys.stderr, flush=True)
        for proc in self._children:
            if proc.poll() is None:
                proc.kill()
        self.abort(code)
