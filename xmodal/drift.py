"""Config drift on resume: a run id continues one experiment, so its config may only change where
the change cannot make the resumed run a hybrid of two.

The newly composed config is compared with the run's ``config.yaml`` before anything is written.
Keys in :data:`HARMLESS` (budgets, intervals, loggers, workers, where files go) may change and are
recorded; every other key — the model, the data and its order, the optimizer, the seed, the
trainer's numerics — is refused unless listed in ``run.allow_changes``. A key nobody classified is
assumed to matter. (A resumed run restores the optimizer from its checkpoint, so even ``model.lr``
would silently keep its old value: refused too.)

The world size (:data:`ELASTIC`) may change on resume, as a requeued job often gets other nodes: the
data stream plans the rest of the epoch over the new layout (every remaining sample once,
``xmodal.data.stream``) and the weights are whole in every rank's checkpoint; ``data.batch_size`` is
the global batch, so the optimization keeps its batch. The change is recorded and warned about.
Runs that shard their weights (FSDP2: a checkpoint directory of one shard per rank) still need
``run.allow_changes``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from xmodal.config import ConfigError

HARMLESS = (
    "run",
    "paths",
    "logger",
    "cluster",
    "test_after_fit",
    "ckpt_path",  # ignored when a run resumes from its own checkpoint
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.val_check_interval",
    "trainer.check_val_every_n_epoch",
    "trainer.log_every_n_steps",
    "trainer.limit_val_batches",
    "trainer.limit_test_batches",
    "trainer.num_sanity_val_steps",
    "trainer.enable_progress_bar",
    "trainer.profiler",
    "trainer.fast_dev_run",
    "trainer.compile",  # how the nets run (same weights, same maths), not what they are
    "trainer.compile_mode",
    "trainer.compile_backend",
    "trainer.channels_last",
    "model.activation_checkpointing",
    "callbacks.num_samples",
    "callbacks.rank_checksums",
    "data.num_workers",
    "data.max_consecutive_failures",
    "data.max_member_bytes",
)
"""Keys (or whole nodes) a resumed run may change: none shapes the model, the data or the optimizer state."""

ELASTIC = ("trainer.devices", "trainer.num_nodes")
"""Keys that set the world size: a resumed run may change them unless its weights are sharded."""

SHARDED_STRATEGIES = ("fsdp2", "fsdp", "model_parallel")

_ABSENT = "<absent>"


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model.heads": 4, ...}``: leaves by dotted key (lists are one value)."""
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat if flat or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def covered(key: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """Whether ``key`` is one of ``patterns`` or lies under one (``model`` covers ``model.heads``)."""
    return any(key == p or key.startswith(p + ".") for p in patterns)


def changes(old_yaml: str, new_yaml: str) -> dict[str, tuple[Any, Any]]:
    """Every leaf that differs between two resolved configs: key → (old, new)."""
    old = flatten(OmegaConf.to_container(OmegaConf.create(old_yaml)))
    new = flatten(OmegaConf.to_container(OmegaConf.create(new_yaml)))
    return {
        key: (old.get(key, _ABSENT), new.get(key, _ABSENT))
        for key in sorted(old.keys() | new.keys())
        if old.get(key, _ABSENT) != new.get(key, _ABSENT)
    }


def show(value: Any) -> str:
    return value if value == _ABSENT else repr(value)


def elastic(key: str, old: Any, new: Any, cfg: DictConfig) -> bool:
    """Whether this change only moves the run to another world size: the device or node count, or
    one replicated data-parallel strategy for another (``ddp`` on 2 devices → ``auto`` on 1), while
    nothing is sharded before or after."""
    if str(cfg.trainer.strategy) in SHARDED_STRATEGIES:
        return False
    if key == "trainer.strategy":
        return old not in SHARDED_STRATEGIES and new not in SHARDED_STRATEGIES
    return covered(key, ELASTIC)


def check_drift(run_dir: Path, cfg: DictConfig) -> list[str]:
    """Refuse (:class:`ConfigError`) a restart whose config changes keys that matter; return one
    ``key: old → new`` line per allowed change (empty for a new run or an unchanged config)."""
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        return []
    diff = changes(saved.read_text(), OmegaConf.to_yaml(cfg, resolve=True))
    allowed = [str(k) for k in cfg.run.allow_changes]
    refused = {
        k: v
        for k, v in diff.items()
        if not covered(k, HARMLESS) and not covered(k, allowed) and not elastic(k, *v, cfg)
    }
    if refused:
        lines = "\n  ".join(f"{k}: {show(old)} → {show(new)}" for k, (old, new) in refused.items())
        keys = ",".join(refused)
        raise ConfigError(
            f"run {cfg.run.id} resumes with a config that changes what it trains (its saved "
            f"config is {saved}):\n  {lines}\n"
            f"Start a new run (another run.id), or allow exactly these changes: run.allow_changes=[{keys}]"
        )
    return [f"{k}: {show(old)} → {show(new)}" for k, (old, new) in diff.items()]


def world_size_note(changed: list[str]) -> str | None:
    """A warning line when a resume changes the world size (``check_drift``'s lines), else None."""
    moved = [line for line in changed if covered(line.split(":", 1)[0], (*ELASTIC, "trainer.strategy"))]
    if not moved:
        return None
    return (
        f"the world size changes on resume ({'; '.join(moved)}): the rest of the epoch is planned over "
        "the new ranks (every remaining sample once in data.mode=exact); data.batch_size stays the "
        "global batch, so each rank now takes another share of it"
    )
