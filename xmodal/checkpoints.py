"""Checkpoint files a run can trust: checked before a resume, written whole in their own directory,
never holding non-finite numbers.

Lightning's own writer (``TorchCheckpointIO`` → ``_atomic_save``) builds the whole checkpoint in
memory and stages it through fsspec in the *system* temp dir before moving it over: a full
``/tmp`` fails a run with room on the output disk, and the final move across file systems is a
copy, not an atomic rename. :class:`RunDirCheckpointIO` writes straight into a partial file beside
the target and renames it.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger("xmodal")

LAST = "last.ckpt"
PREVIOUS = "last.prev.ckpt"
"""The last checkpoint before the newest one: the fallback when ``last.ckpt`` turns out corrupt."""
BEST = "best.ckpt"
PARTIAL_SUFFIX = ".partial"


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be loaded (missing, 0 bytes, truncated, not a torch checkpoint), or None.

    Structural only: reads the zip's central directory and checks every member lies inside the
    file, without unpickling anything, so every rank can run it and reach the same verdict cheaply.
    A truncated zip loses its end-of-archive record, so truncation anywhere is caught; a flipped bit
    inside a tensor is not (that would take reading every byte twice on every rank).
    """
    try:
        if path.is_dir():  # a distributed (FSDP2) checkpoint: torch.distributed.checkpoint's layout
            metadata = path / ".metadata"
            if not metadata.is_file() or metadata.stat().st_size == 0:
                return "distributed checkpoint without its .metadata (an interrupted write)"
            return None
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    if size == 0:
        return "0 bytes"
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except zipfile.BadZipFile:
        return f"not a complete torch checkpoint (no zip end record in its {size} bytes: truncated?)"
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    if not any(m.filename == "data.pkl" or m.filename.endswith("/data.pkl") for m in members):
        return "a zip without torch's data.pkl"
    for member in members:
        # 30 bytes of local header, then the name and extra field, then the data.
        end = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
        if end + member.compress_size > size:
            return f"truncated inside member {member.filename} ({size} bytes)"
    return None


def resume_candidates(run_dir: Path) -> list[Path]:
    """Checkpoints a rerun of this run could continue from, newest first (by mtime).

    ``last.ckpt`` is normally the newest; ``last.prev.ckpt`` and ``best.ckpt`` are the fallbacks
    when it is corrupt; ``hpc_ckpt_N.ckpt`` come from Lightning's own SLURM auto-requeue (see
    :func:`xmodal.run.resume_checkpoint`).
    """
    ckpt_dir = run_dir / "checkpoints"
    paths = [ckpt_dir / LAST, ckpt_dir / PREVIOUS, ckpt_dir / BEST, *run_dir.glob("hpc_ckpt_*.ckpt")]
    stamped = []
    for rank, path in enumerate(paths):
        try:
            stamped.append((-path.stat().st_mtime_ns, rank, path))  # ties: the order above
        except OSError:
            continue
    return [path for _, _, path in sorted(stamped)]


def move_aside(path: Path) -> Path:
    """Rename an unusable checkpoint out of the way (never delete it: it may be recoverable)."""
    target = path.with_name(f"{path.name}.corrupt-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}")
    os.replace(path, target)
    return target


class NoIntactCheckpoint(Exception):
    """Every checkpoint of a run that has some is corrupt (a one-line user error)."""


def choose_resume(run_dir: Path, move_corrupt: bool) -> Path | None:
    """The newest intact checkpoint of the run dir, or None when it has none.

    Corrupt ones newer than it are moved aside (by the launcher only, ``move_corrupt``: every rank
    chooses, and they all reach the same verdict on the same bytes), with a warning naming both
    files. When checkpoints exist but none is intact, nothing is moved and
    :class:`NoIntactCheckpoint` is raised: silently starting over would overwrite the run's history.
    """
    corrupt: list[tuple[Path, str]] = []
    for path in resume_candidates(run_dir):
        problem = checkpoint_problem(path)
        if problem == "missing":  # e.g. moved aside by the launcher meanwhile
            continue
        if problem is not None:
            corrupt.append((path, problem))
            continue
        for bad, why in corrupt if move_corrupt else ():
            kept = move_aside(bad)
            log.warning(
                "checkpoint %s is unusable (%s): moved aside to %s; resuming from %s instead",
                bad,
                why,
                kept.name,
                path,
            )
        return path
    if corrupt:
        listed = "; ".join(f"{p.name}: {why}" for p, why in corrupt)
        raise NoIntactCheckpoint(
            f"run dir {run_dir} has no intact checkpoint to resume from ({listed}); "
            "start a new run.id, or set run.resume=false to train this run again from scratch"
        )
    return None


# ----------------------------------------------------------------------------- non-finite state
def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor  # FSDP2 DTensor: this shard


def _float_tensors(named: Iterable[tuple[str, Any]]) -> Iterable[tuple[str, torch.Tensor]]:
    for name, value in named:
        if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
            yield name, _local(value)


def training_tensors(
    module: torch.nn.Module, optimizers: Iterable[Any]
) -> Iterable[tuple[str, torch.Tensor]]:
    """Every floating tensor a checkpoint would hold: weights, buffers (EMA copies, batch-norm
    statistics) and optimizer states (this rank's shards under FSDP2)."""
    yield from _float_tensors(module.state_dict().items())
    for i, optimizer in enumerate(optimizers):
        for j, state in enumerate(optimizer.state.values()):
            yield from _float_tensors((f"optimizer{i}.state{j}.{k}", v) for k, v in state.items())


def nonfinite_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity (one host sync per device, not per tensor)."""
    named = list(tensors)
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for _, tensor in named:
        flags.setdefault(tensor.device, []).append(torch.isfinite(tensor).all())
    if all(bool(torch.stack(f).all()) for f in flags.values()):
        return []
    return [name for name, tensor in named if not bool(torch.isfinite(tensor).all())]


# ----------------------------------------------------------------------------- writing
class RunDirCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into ``<name>.partial`` beside the target, fsync, rename over it.

    A failed write (disk full, an exception while serialising) removes its partial file; a killed
    one leaves ``<name>.partial``, which the next write of the same name replaces.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + PARTIAL_SUFFIX)
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        fsync_dir(target.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
