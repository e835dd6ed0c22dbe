"""Render sbatch scripts from a composed config, and the checks a job must pass before it is queued.

One script per sweep point: ``#SBATCH`` resources come from ``trainer`` (nodes, processes per node)
and ``cluster`` (partition, account, time, …); the body runs ``cluster.setup``, exports the
rendezvous address and port, and starts one ``xmodal-train`` process per device with ``srun``.
Lightning's ``SLURMEnvironment`` reads each process's rank from ``SLURM_PROCID``; its own requeue
handler is off (``auto_requeue=False`` in :mod:`xmodal.factory`). The SIGUSR2 that the
``--signal=USR2@N`` line written here asks for is handled by :mod:`xmodal.callbacks.preemption`:
it writes ``checkpoints/last.ckpt`` at the next step boundary and runs ``scontrol requeue``.

The script never sets ``run.id``: every rank derives it from ``$SLURM_JOB_ID``, which a requeued job
keeps, so the job finds its own run dir, checkpoints and W&B run again.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from xmodal.config import validate, world_size

GPU_ACCELERATORS = ("gpu", "cuda")

PATH_KEYS = ("paths.output_dir", "paths.data_dir", "data.shards", "ckpt_path")
"""Config paths the job must see as absolute: relative ones are resolved against the submit dir."""

# sbatch options xmodal-submit derives from the config: setting them again in cluster.sbatch_args
# would let the allocation disagree with what the trainer expects (Lightning then stops at start-up).
_DERIVED_OPTIONS = {
    "nodes": "trainer.num_nodes",
    "N": "trainer.num_nodes",
    "ntasks-per-node": "trainer.devices",
    "ntasks": "trainer.devices × trainer.num_nodes (use --ntasks-per-node via trainer.devices)",
    "n": "trainer.devices × trainer.num_nodes (use --ntasks-per-node via trainer.devices)",
    "gpus-per-node": "trainer.devices",
    "gpus": "trainer.devices",
    "G": "trainer.devices",
    "gres": "trainer.devices (GPUs are requested with --gpus-per-node)",
    "cpus-per-task": "cluster.cpus_per_task",
    "c": "cluster.cpus_per_task",
    "time": "cluster.time",
    "t": "cluster.time",
    "partition": "cluster.partition",
    "p": "cluster.partition",
    "account": "cluster.account",
    "A": "cluster.account",
    "qos": "cluster.qos",
    "q": "cluster.qos",
    "mem-per-gpu": "cluster.mem_per_gpu",
    "signal": "cluster.signal_seconds (the signal is always USR2, as xmodal's Preemption callback expects)",
    "requeue": "cluster.requeue",
    "no-requeue": "cluster.requeue",
    "open-mode": "nothing: logs are always appended so a requeued job keeps its earlier output",
    "output": "--sbatch-dir (logs go to <sbatch-dir>/logs)",
    "o": "--sbatch-dir (logs go to <sbatch-dir>/logs)",
    "error": "--sbatch-dir (logs go to <sbatch-dir>/logs)",
    "e": "--sbatch-dir (logs go to <sbatch-dir>/logs)",
    "array": "-m sweeps (one job per point; an array would run one config N times)",
    "a": "-m sweeps (one job per point; an array would run one config N times)",
    "chdir": "the submit directory (the script cds there)",
    "D": "the submit directory (the script cds there)",
}

# SLURM time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def time_to_seconds(value: str) -> int | None:
    """Seconds in a SLURM ``--time`` value, or None when it is not one."""
    match = _TIME.match(str(value).strip())
    if not match:
        return None
    days, a, b, c = match.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = int(a), int(b or 0), int(c or 0)
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if c is not None:  # H:M:S
        return (int(a) * 60 + int(b)) * 60 + int(c)
    if b is not None:  # M:S
        return int(a) * 60 + int(b)
    return int(a) * 60  # M


def uses_gpus(cfg: DictConfig) -> bool:
    """Whether the job asks SLURM for GPUs: a GPU accelerator, or ``auto`` on a GPU partition."""
    accelerator = cfg.trainer.accelerator
    return accelerator in GPU_ACCELERATORS or (accelerator == "auto" and bool(cfg.cluster.gpu_partition))


def _option_name(arg: str) -> str | None:
    """'--nodes=2' -> 'nodes', '-N2' / '-N 2' -> 'N'; None for something that is not an option."""
    arg = arg.strip()
    if arg.startswith("--"):
        return arg[2:].split("=", 1)[0].split()[0] if len(arg) > 2 else None
    if arg.startswith("-") and len(arg) > 1:
        return arg[1]
    return None


def cluster_problems(cfg: DictConfig) -> list[str]:
    """What would make this config fail or misbehave as a SLURM job, as '<key>: <why> (got <value>)'."""
    problems: list[str] = []

    def check(ok: bool, key: str, why: str) -> None:
        if not ok:
            problems.append(f"{key}: {why} (got {OmegaConf.select(cfg, key)!r})")

    t, c = cfg.trainer, cfg.cluster
    gpu_partition = bool(c.gpu_partition)
    if not gpu_partition:
        check(
            t.accelerator not in GPU_ACCELERATORS,
            "trainer.accelerator",
            "is a GPU trainer but cluster.gpu_partition=false (a CPU partition); "
            "use trainer=cpu or trainer=ddp_cpu, or a cluster config for a GPU partition",
        )
        if t.accelerator == "auto":  # validate() already covers an explicit "cpu"
            check(
                not str(t.precision).startswith("16"),
                "trainer.precision",
                "16-bit float precision needs a GPU but cluster.gpu_partition=false; use bf16-mixed or 32-true",
            )
            check(
                t.strategy != "fsdp",
                "trainer.strategy",
                "Lightning's FSDP1 'fsdp' needs a GPU but cluster.gpu_partition=false; use trainer=fsdp2",
            )
    check(t.accelerator != "mps", "trainer.accelerator", "mps is Apple silicon only; use gpu or cpu on SLURM")
    if uses_gpus(cfg):
        limit = int(c.max_devices_per_node)
        check(
            t.devices <= limit,
            "trainer.devices",
            f"is the number of GPUs (and srun tasks) per node and no node here has more than {limit}; "
            f"spread the job with trainer.num_nodes instead",
        )
    if world_size(cfg) > 1:
        check(
            t.strategy != "ddp_spawn",
            "trainer.strategy",
            "srun already starts one process per device; ddp_spawn would spawn more in each. Use ddp",
        )
    seconds = time_to_seconds(c.time)
    check(seconds is not None and seconds > 0, "cluster.time", "is not a SLURM time (M, H:M:S, D-H:M:S, …)")
    check(c.signal_seconds >= 1, "cluster.signal_seconds", "must be >= 1")
    check(c.signal_seconds <= 65535, "cluster.signal_seconds", "SLURM allows at most 65535")
    if seconds:
        check(
            c.signal_seconds < seconds,
            "cluster.signal_seconds",
            f"must be shorter than cluster.time ({seconds} s), or the job is signalled before it starts",
        )
    check(c.cpus_per_task >= 1, "cluster.cpus_per_task", "must be >= 1")
    for arg in c.sbatch_args:
        name = _option_name(str(arg))
        if name is None:
            problems.append(
                f"cluster.sbatch_args: each entry is one sbatch option like '--constraint=a100' (got {arg!r})"
            )
        elif name == "gres" and "gpu" not in str(arg):
            continue  # non-GPU generic resources (e.g. local disk) are the user's business
        elif name in _DERIVED_OPTIONS:
            problems.append(
                f"cluster.sbatch_args: {arg.split('=', 1)[0]} is derived from {_DERIVED_OPTIONS[name]}; "
                f"set that instead (got {arg!r})"
            )
    return problems


def validate_for_submit(cfg: DictConfig) -> None:
    """:func:`xmodal.config.validate` as the compute node will see it, plus :func:`cluster_problems`.

    ``validate`` refuses a GPU trainer when *this* process sees no CUDA device, but the submit host
    (a login node) usually has none: what matters is the partition the job runs on. So CUDA is
    taken as available while validating, and :func:`cluster_problems` refuses GPU trainers (and
    16-bit or FSDP1 on ``auto``) when ``cluster.gpu_partition`` is false. Every other check runs
    unchanged; paths (shards, checkpoints) are checked on this host, which assumes a shared file
    system, as SLURM clusters have.
    """
    validate(cfg, cuda_available=True, more_problems=cluster_problems(cfg))


def _hydra_value(path: str) -> str:
    """A path as a Hydra override value: bare when Hydra's grammar allows it, else single-quoted."""
    if re.fullmatch(r"[A-Za-z0-9_./+:@%-]+", path):
        return path
    # Hydra's quoted strings: backslashes need doubling only before a quote or at the end.
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, path)
    return "'" + escaped.replace("'", "\\'") + "'"


def absolute_path_overrides(cfg: DictConfig, submit_dir: Path) -> dict[str, str]:
    """``{key: override}`` for each relative path in :data:`PATH_KEYS`, made absolute from ``submit_dir``.

    The job ``cd``s into the submit dir anyway; absolute paths in the script also make it correct
    when it is copied and run from elsewhere, and show in ``config.yaml`` where the files went.
    """
    out = {}
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        path = Path(str(value)).expanduser()
        if not path.is_absolute():
            out[key] = f"{key}={_hydra_value(str(submit_dir / path))}"
        elif str(value).startswith("~"):
            out[key] = f"{key}={_hydra_value(str(path))}"
    return out


def job_name(cfg: DictConfig) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", str(cfg.experiment_name)) or "xmodal"
    # Lightning's SLURMEnvironment treats jobs named bash/interactive as interactive shells.
    return f"xmodal-{name}" if name in ("bash", "interactive") else name


def render_sbatch(
    cfg: DictConfig,
    overrides: list[str],
    *,
    submit_dir: Path,
    log_dir: Path,
    config_name: str = "train",
    header: str = "",
) -> str:
    """The sbatch script of one job: ``overrides`` are passed to ``xmodal-train`` exactly as given."""
    t, c = cfg.trainer, cfg.cluster
    gpus = uses_gpus(cfg)
    q = shlex.quote
    lines = ["#!/bin/bash"]
    lines += [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += [
        "# Resources: edit these #SBATCH lines, or better the config (cluster.*, trainer.devices,",
        "# trainer.num_nodes) and submit again. --nodes must equal trainer.num_nodes and",
        "# --ntasks-per-node trainer.devices: Lightning's SLURMEnvironment stops at start-up otherwise.",
        f"#SBATCH --job-name={job_name(cfg)}",
        f"#SBATCH --nodes={t.num_nodes}",
        "# one srun task (= one training process, one rank) per device",
        f"#SBATCH --ntasks-per-node={t.devices}",
    ]
    if gpus:
        lines.append(f"#SBATCH --gpus-per-node={t.devices}")
    else:
        lines.append("# CPU job (no GPUs requested): each rank is a gloo process")
    lines.append(f"#SBATCH --cpus-per-task={c.cpus_per_task}")
    if c.mem_per_gpu and gpus:
        lines.append(f"#SBATCH --mem-per-gpu={c.mem_per_gpu}")
    elif c.mem_per_gpu:
        lines.append(f"# cluster.mem_per_gpu={c.mem_per_gpu} ignored: this job requests no GPUs")
    lines.append(f"#SBATCH --time={c.time}")
    for option, value in (("partition", c.partition), ("account", c.account), ("qos", c.qos)):
        if value:
            lines.append(f"#SBATCH --{option}={value}")
    lines += [
        f"# SIGUSR2 {c.signal_seconds} s before the time limit (cluster.signal_seconds): xmodal's Preemption",
        "# callback stops at the next step boundary, writes checkpoints/last.ckpt atomically (with the",
        "# data-stream position) and runs `scontrol requeue`; the requeued job resumes from it. SIGTERM",
        "# (scancel) saves the same way without requeueing. Lightning's requeue handler is off, so it",
        "# writes no hpc_ckpt_N.ckpt. USR2, not USR1, which NCCL may catch; submitit uses USR2 too.",
        f"#SBATCH --signal=USR2@{c.signal_seconds}",
    ]
    lines.append("#SBATCH --requeue" if c.requeue else "#SBATCH --no-requeue")
    lines += [
        "# a requeued job keeps its id and appends to the same log files",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={log_dir}/%x-%j.out",
        f"#SBATCH --error={log_dir}/%x-%j.err",
    ]
    lines += [f"#SBATCH {arg}" for arg in c.sbatch_args]
    command = "xmodal-train" if config_name == "train" else f"xmodal-train --config-name {q(config_name)}"
    output_dir = Path(str(cfg.paths.output_dir)).expanduser()
    output_dir = output_dir if output_dir.is_absolute() else submit_dir / output_dir
    run_dir = f"{output_dir}/{cfg.experiment_name}/" + (
        "${SLURM_JOB_ID}" if cfg.run.id is None else cfg.run.id
    )
    lines += [
        "",
        "set -eo pipefail",
        "",
        "# The job runs in the directory xmodal-submit was called from (relative paths, git.txt).",
        f"cd {q(str(submit_dir))}",
        "",
        "# Environment (cluster.setup): module loads, virtualenv/conda activation, exports.",
        *(str(line) for line in c.setup),
        "",
        "# Rendezvous for torch.distributed: the first node of the allocation, and a port from the job",
        "# id (Lightning's own formula, 15000 + its last 4 digits), the same on every rank and after a",
        "# requeue.",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_PORT=$((15000 + SLURM_JOB_ID % 10000))",
        "# Slurm >= 22.05: srun does not inherit --cpus-per-task from sbatch.",
        'export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"',
        "export HYDRA_FULL_ERROR=1",
        "",
        "# No run.id below: every rank takes it from $SLURM_JOB_ID, and a requeued job keeps its job id,",
        "# so it finds its own run dir, resumes from its newest checkpoint and continues its W&B run.",
        "# (A run.id here would make every submission of this script share, and resume, one run.)",
        f'echo "xmodal: run dir {run_dir} (restart ${{SLURM_RESTART_COUNT:-0}})"',
        "",
        "# One process per device; Lightning's SLURMEnvironment reads the rank from SLURM_PROCID.",
        f"srun --kill-on-bad-exit=1 {command}" + (" \\" if overrides else " &"),
    ]
    for i, override in enumerate(overrides):
        lines.append(f"    {q(override)}" + (" \\" if i < len(overrides) - 1 else " &"))
    lines += SIGNAL_FORWARDING
    return "\n".join(lines) + "\n"


SIGNAL_FORWARDING = [
    "",
    "# srun runs in the background so that this shell can forward signals meant for the batch shell",
    "# alone (--signal=B:USR2, `scancel --batch -s USR2`, a TERM to the shell) to the training step,",
    "# which then checkpoints and requeues as for the step's own USR2. `wait` returns early when a",
    "# trapped signal arrives, so it waits again until the step has really ended; the job's exit",
    "# status is the step's.",
    "step=$!",
    "trap 'kill -USR2 \"$step\" 2>/dev/null || true' USR2",
    "trap 'kill -TERM \"$step\" 2>/dev/null || true' TERM",
    "status=0",
    'wait "$step" || status=$?',
    'while kill -0 "$step" 2>/dev/null; do status=0; wait "$step" || status=$?; done',
    'exit "$status"',
]
"""The script's last lines (also in slurm/*.sbatch): signals of the batch shell reach the step."""


def bash_syntax_error(script: str) -> str | None:
    """``bash -n``'s complaint about a script (e.g. a broken cluster.setup line), or None."""
    bash = shutil.which("bash")
    if bash is None:
        return None
    result = subprocess.run([bash, "-n"], input=script, capture_output=True, text=True, timeout=30)
    return (result.stderr.strip() or "syntax error") if result.returncode else None


def timestamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S-%f")
