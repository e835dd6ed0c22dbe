"""The end-of-run summary: what a run left and the exact commands that come next.

``xmodal-train`` prints it at the end of a run (finished, or stopped by a signal after saving) and
writes it into the run dir as ``summary.json`` (machine-readable, one fixed key set) and
``summary.txt`` (the printed text). ``metrics.json`` stays the metrics record; this file is for
the person who launched the run: where the best checkpoint is, how good it is, and what to type
next (evaluate, generate, resume, ``wandb sync``).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmodal.callbacks.progress import format_duration
from xmodal.files import write_json_atomic
from xmodal.registry import MODALITIES

SUMMARY_KEYS = (
    "status",
    "stop_reason",
    "run_id",
    "run_dir",
    "wall_time_s",
    "steps",
    "max_steps",
    "global_step",
    "monitor",
    "best_score",
    "best_checkpoint",
    "last_checkpoint",
    "test",
    "skipped_samples",
    "commands",
)
COMMAND_KEYS = ("eval", "generate", "resume", "wandb_sync")

# Overrides that say which data a checkpoint is evaluated on: ``xmodal-eval`` composes the default
# experiment's data unless told the same as the training command.
_DATA_OVERRIDES = ("experiment=", "data.", "data=", "paths.data_dir=")


@dataclass(frozen=True)
class RunOutcome:
    """What the end of ``train()`` knows about a run, in plain values (no trainer objects)."""

    run_id: str
    run_dir: Path
    wall_time_s: float
    steps: int
    """Steps done in the units of ``trainer.max_steps`` (a GAN: iterations)."""
    max_steps: int
    global_step: int
    """Lightning's optimizer steps."""
    monitor: str
    best_score: float | None
    best_checkpoint: str | None
    test: dict[str, float] | None
    skipped: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    """Samples skipped as unreadable, per split and shard."""
    stop_reason: str | None = None
    """None when the run finished; else why it stopped (``SIGTERM``), after saving."""
    argv: Sequence[str] = ()
    """The training command's overrides (``sys.argv[1:]``)."""
    cwd: str = ""
    generate_args: str = ""
    """``xmodal-generate`` input flags for this task (:func:`generate_args`)."""


def generate_args(task_cfg: Any, roles: Mapping[str, str], output_dir: Path) -> str:
    """The ``xmodal-generate`` flags a task takes its inputs through, with placeholders: the
    task's ``source`` role (a captioner, a translator) or its ``condition`` (GAN, VAE; none: an
    unconditional sample). A role names its modality in ``data.roles``, else is the modality."""
    source = getattr(task_cfg, "source", None)
    role = source or getattr(task_cfg, "condition", None)
    out = [] if source else ["--num", "8", "--out", str(output_dir)]
    # A list of conditions (model.condition=[text, audio]) takes one flag each.
    wanted = [role] if isinstance(role, str) else list(role or [])
    words = []
    for name in (r for r in wanted if r != "none"):
        modality = roles.get(name, name)
        flag = MODALITIES.attr(modality, "input_flag") or modality
        placeholder = "FILES_OR_FOLDER" if MODALITIES.attr(modality, "input_files") else flag.upper()
        words += [f"--{flag}", placeholder]
    return shlex.join([*words, *out])


def _in_cwd(cwd: str, words: list[str]) -> str:
    prefix = f"cd {shlex.quote(cwd)} && " if cwd else ""
    return prefix + shlex.join(words)


def resume_command(run_id: str, argv: Sequence[str], cwd: str) -> str:
    """The training command again, pinned to its run id (a rerun with the same id resumes it)."""
    args = [a for a in argv if not a.lstrip("+").startswith("run.id=")]
    return _in_cwd(cwd, ["xmodal-train", *args, f"run.id={run_id}"])


def next_commands(outcome: RunOutcome) -> dict[str, str | None]:
    """The exact commands after this run; None where one does not apply (resume: only after a stop)."""
    run_dir, ckpt = outcome.run_dir, outcome.best_checkpoint
    data = [a for a in outcome.argv if a.lstrip("+").startswith(_DATA_OVERRIDES)]
    stopped = outcome.stop_reason is not None
    resume = resume_command(outcome.run_id, outcome.argv, outcome.cwd) if stopped else None
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    return {
        "eval": _in_cwd(outcome.cwd, ["xmodal-eval", f"ckpt_path={ckpt}", *data]) if ckpt else None,
        "generate": f"xmodal-generate {shlex.quote(ckpt)} {outcome.generate_args}".rstrip() if ckpt else None,
        "resume": resume,
        "wandb_sync": shlex.join(["wandb", "sync", str(offline[-1])]) if offline else None,
    }


def build_summary(outcome: RunOutcome) -> dict[str, Any]:
    """The ``summary.json`` payload: exactly :data:`SUMMARY_KEYS`."""
    last = outcome.run_dir / "checkpoints" / "last.ckpt"
    summary = {
        "status": "finished" if outcome.stop_reason is None else "stopped",
        "stop_reason": outcome.stop_reason,
        "run_id": outcome.run_id,
        "run_dir": str(outcome.run_dir),
        "wall_time_s": round(outcome.wall_time_s, 1),
        "steps": outcome.steps,
        "max_steps": outcome.max_steps,
        "global_step": outcome.global_step,
        "monitor": outcome.monitor,
        "best_score": outcome.best_score,
        "best_checkpoint": outcome.best_checkpoint,
        "last_checkpoint": str(last) if last.exists() else None,
        "test": outcome.test,
        "skipped_samples": {split: sum(shards.values()) for split, shards in outcome.skipped.items()},
        "commands": next_commands(outcome),
    }
    assert tuple(summary) == SUMMARY_KEYS
    return summary


def summary_text(summary: Mapping[str, Any]) -> str:
    """The printed summary: one fact per line, the commands last (each whole on one line)."""
    stopped = summary["status"] == "stopped"
    head = f"stopped by {summary['stop_reason']}" if stopped else "finished"
    steps = f"{summary['steps']}/{summary['max_steps']}" if summary["max_steps"] > 0 else summary["steps"]
    lines = [
        f"run {summary['run_id']} {head} after {format_duration(summary['wall_time_s'])}, step {steps}",
        f"  run dir:          {summary['run_dir']}",
    ]
    score = summary["best_score"]
    best = summary["best_checkpoint"] or "none saved"
    lines.append(
        f"  best checkpoint:  {best}" + (f" ({summary['monitor']} {score:.4g})" if score is not None else "")
    )
    lines.append(f"  last checkpoint:  {summary['last_checkpoint'] or 'none saved'}")
    if summary["test"]:
        lines.append(
            "  test:             " + "  ".join(f"{k} {v:.4g}" for k, v in sorted(summary["test"].items()))
        )
    skipped = summary["skipped_samples"]
    lines.append(
        "  skipped samples:  "
        + (", ".join(f"{split} {n}" for split, n in sorted(skipped.items())) if skipped else "none")
    )
    names = {"resume": "resume", "eval": "evaluate", "generate": "generate", "wandb_sync": "upload to W&B"}
    commands = [(name, summary["commands"][key]) for key, name in names.items() if summary["commands"][key]]
    if commands:
        lines.append("next:")
        lines += [f"  {name + ':':<15} {command}" for name, command in commands]
    return "\n".join(lines) + "\n"


def write_summary(run_dir: Path, summary: Mapping[str, Any]) -> str:
    """``summary.json`` and ``summary.txt`` into the run dir; returns the text."""
    text = summary_text(summary)
    write_json_atomic(run_dir / "summary.json", dict(summary), sort_keys=False)
    partial = run_dir / "summary.txt.partial"
    partial.write_text(text)
    os.replace(partial, run_dir / "summary.txt")
    return text
