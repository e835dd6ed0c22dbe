"""Run identity: one id and one directory per job, shared by every rank and by a requeued job.

The id is decided once, in the launching process, and handed to the ranks Lightning starts
through ``$XMODAL_RUN_ID`` (their environment is a copy of the launcher's). Ranks started by
``srun`` derive the same id from the SLURM job id. A fresh id carries microseconds and a random
suffix, and its directory is created with ``exist_ok=False``, so two jobs never share a dir.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

RUN_ID_ENV = "XMODAL_RUN_ID"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def is_launcher() -> bool:
    """True in the process a user (or sbatch) started, False in ranks started by a launcher.

    Read from the environment because it is needed before torch.distributed exists.
    """
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        value = os.environ.get(var)
        if value not in (None, "", "0"):
            return False
    return True


def slurm_run_id() -> str | None:
    """The job's SLURM identity: stable across requeues of the same job."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID") or None


def fresh_run_id() -> str:
    # Microseconds alone still collide for jobs launched together on different hosts.
    return datetime.now().strftime("%Y%m%d-%H%M%S-%f") + "-" + secrets.token_hex(3)


def check_run_id(run_id: str) -> str:
    if not _SAFE_ID.match(run_id):
        from xmodal.config import ConfigError

        raise ConfigError(
            f"invalid config:\n  run.id: must be 1-128 characters of letters, digits, '.', '_' or '-' "
            f"and start with a letter or digit (got {run_id!r})"
        )
    return run_id


@dataclass(frozen=True)
class RunIdentity:
    id: str
    dir: Path
    fresh: bool
    """True when this invocation created the run (a new id), False when it joins or resumes one."""


def decide_run(cli_id: str | None, output_dir: Path, experiment: str) -> RunIdentity:
    """Pick the run id and create its directory (launcher) or find it (other ranks)."""
    if cli_id:
        run_id = check_run_id(str(cli_id))
    elif not is_launcher() and os.environ.get(RUN_ID_ENV):
        run_id = os.environ[RUN_ID_ENV]
    else:
        run_id = slurm_run_id()
    if run_id is not None:
        run_dir = output_dir / experiment / run_id
        fresh = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        return RunIdentity(run_id, run_dir, fresh)
    for _ in range(8):
        run_id = fresh_run_id()
        run_dir = output_dir / experiment / run_id
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            continue
        return RunIdentity(run_id, run_dir, True)
    raise RuntimeError(f"could not create a unique run dir under {output_dir / experiment}")


def export_run_id(run_id: str) -> None:
    """Hand the id to the ranks the launcher is about to start."""
    os.environ[RUN_ID_ENV] = run_id


def forget_run_id() -> None:
    """Called when a job ends, so the next job of a multirun picks its own id."""
    os.environ.pop(RUN_ID_ENV, None)


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a rerun of this run continues from: the newest (by mtime) of
    ``checkpoints/last.ckpt`` and any ``hpc_ckpt_N.ckpt`` in the run dir, or None.

    xmodal itself only writes ``last.ckpt``: on SIGUSR2/SIGTERM its ``Preemption`` callback saves
    it, and Lightning's ``SLURMEnvironment`` is built with ``auto_requeue=False``
    (:func:`xmodal.factory.build_trainer`), so Lightning writes no ``hpc_ckpt_N.ckpt``. Those files
    come from Lightning's own SLURM auto-requeue (on by default), which saves them into
    ``default_root_dir``: they are accepted so that a run dir a plain Lightning setup was preempted
    in still resumes from its newest state.

    Unchecked: ``xmodal-train`` resumes through :func:`xmodal.checkpoints.choose_resume`, which
    also considers the fallbacks (``last.prev.ckpt``, ``best.ckpt``) and skips corrupt files.
    """
    candidates = [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")]
    existing = [path for path in candidates if path.exists()]
    return max(existing, key=lambda path: path.stat().st_mtime_ns) if existing else None


def _git(args: list[str]) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout


def keep_config(run_dir: Path, config_yaml: str) -> Path | None:
    """Write ``config.yaml``; a previous one that differs is kept as ``config.<n>.yaml`` (n = 1, 2,
    ... in restart order), never overwritten. Returns where the previous one went, if anywhere."""
    current = run_dir / "config.yaml"
    kept = None
    if current.is_file() and current.read_text() != config_yaml:
        n = 1
        while (run_dir / f"config.{n}.yaml").exists():
            n += 1
        kept = run_dir / f"config.{n}.yaml"
        os.replace(current, kept)
    partial = run_dir / "config.yaml.partial"
    partial.write_text(config_yaml)
    os.replace(partial, current)
    return kept


def write_provenance(run_dir: Path, config_yaml: str, changes: Sequence[str] = ()) -> None:
    """config.yaml (resolved; earlier versions kept), cmd.txt (appended on every (re)start, with the
    config changes of a restart) and git.txt."""
    kept = keep_config(run_dir, config_yaml)
    with open(run_dir / "cmd.txt", "a") as f:
        # One comment line per (re)start: what changed is on it, the command follows.
        notes = [f"changed {'; '.join(changes)}"] if changes else []
        notes += [f"previous config kept as {kept.name}"] if kept is not None else []
        stamp = f"# {datetime.now().isoformat(timespec='seconds')} cwd={os.getcwd()}"
        f.write(" | ".join([stamp, *notes]) + "\n")
        f.write(shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) + "\n")
    commit = _git(["rev-parse", "HEAD"]).strip()
    if commit:
        git = f"commit: {commit}\n\n# git status --short\n{_git(['status', '--short'])}\n# git diff HEAD\n"
        git += _git(["diff", "HEAD"])
    else:
        git = f"not a git repository: {os.getcwd()}\n"
    (run_dir / "git.txt").write_text(git)


def wandb_run_id(run_dir: Path, run_id: str) -> str:
    """The W&B run id of this run: made once, kept in the run dir so a rerun resumes the same run."""
    path = run_dir / "wandb_id.txt"
    if path.exists():
        return path.read_text().strip()
    # W&B ids may not contain dots; keep the rest of the run id readable.
    wid = re.sub(r"[^A-Za-z0-9_-]", "-", run_id)[:64]
    path.write_text(wid + "\n")
    return wid
