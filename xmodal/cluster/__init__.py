"""Cluster launch: render SLURM sbatch scripts from a composed config (``xmodal-submit``)."""

from xmodal.cluster.slurm import (
    absolute_path_overrides,
    cluster_problems,
    render_sbatch,
    time_to_seconds,
    uses_gpus,
    validate_for_submit,
)

__all__ = [
    "absolute_path_overrides",
    "cluster_problems",
    "render_sbatch",
    "time_to_seconds",
    "uses_gpus",
    "validate_for_submit",
]
