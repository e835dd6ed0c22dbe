"""xmodal-submit: one sbatch script per sweep point, submitted without waiting for the jobs.

xmodal-submit trainer=ddp trainer.devices=4 cluster.partition=gpu      # one job, 4 GPUs
xmodal-submit -m seed=1,2,3 model.lr=1e-3,3e-4                          # 6 jobs, returns at once
xmodal-submit -m 'seed=range(3)' trainer.num_nodes=2 --dry-run          # print the scripts only
xmodal-submit --sbatch-dir my_jobs --dry-run                            # write them, for sbatch by hand

Each point is composed exactly like ``xmodal-train`` would compose it, and every point is checked
(:func:`xmodal.config.validate` plus the cluster checks of :mod:`xmodal.cluster.slurm`) before the
first ``sbatch`` call, so a bad sweep submits nothing. Scripts and SLURM logs go to ``--sbatch-dir``
(default ``<paths.output_dir>/<experiment_name>/sbatch/<timestamp>/``); each job's run dir is
``<paths.output_dir>/<experiment_name>/<SLURM job id>``. Exit status: 0 submitted (or printed),
1 an sbatch call failed, 2 a config, usage or environment error (nothing submitted).
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from xmodal.cluster.slurm import (
    absolute_path_overrides,
    bash_syntax_error,
    render_sbatch,
    timestamp,
    validate_for_submit,
)
from xmodal.config import ConfigError, compose_config
from xmodal.console import print_error


class SubmitError(Exception):
    """A usage or environment problem: nothing was submitted (exit 2)."""


@dataclass
class Job:
    overrides: list[str]
    """Exactly what the script passes to xmodal-train (the point's overrides + absolute paths)."""
    cfg: DictConfig
    script: str = ""
    path: Path | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="xmodal-submit",
        description="Render one sbatch script per sweep point from the composed config and submit it "
        "with sbatch, without waiting for the jobs.",
        epilog="examples:\n" + "\n".join("  " + line for line in __doc__.splitlines()[2:6]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for xmodal-train")
    parser.add_argument(
        "-m",
        "--multirun",
        action="store_true",
        help="expand sweep overrides (a=1,2  'b=range(3)'  'c=choice(x,y)') into one job per point",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the scripts; submit nothing")
    parser.add_argument(
        "--sbatch-dir",
        type=Path,
        default=None,
        help="where scripts and SLURM logs go (default <paths.output_dir>/<experiment_name>/sbatch/<time>)",
    )
    parser.add_argument("--config-name", default="train", help="primary config (default: train)")
    return parser.parse_intermixed_args(argv)


def expand_sweep(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override list of every sweep point, in Hydra's BasicSweeper order (cartesian product).

    Parsed with Hydra's own override grammar, so ``a=1,2``, ``range(…)``, ``choice(…)``, ``glob(…)``
    and quoted values behave exactly as under ``xmodal-train -m``. Non-sweep overrides are kept as
    typed; swept values are Hydra's rendering of each value.
    """
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise SubmitError(str(err)) from err
    choices: list[list[str]] = []
    for override in parsed:
        if not override.is_sweep_override():
            choices.append([override.input_line])
            continue
        if not multirun:
            raise SubmitError(
                f"{override.input_line!r} is a sweep; add -m to submit one job per value "
                "(as xmodal-train -m would run them)"
            )
        if not override.is_discrete_sweep():
            raise SubmitError(f"{override.input_line!r}: interval sweeps need an optimizing sweeper")
        key = override.get_key_element()
        choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
    return [list(point) for point in itertools.product(*choices)]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def prepare(points: list[list[str]], config_name: str, submit_dir: Path) -> tuple[list[Job], list[str]]:
    """Compose and check every point; returns the jobs and the problems (empty when all are fine)."""
    jobs: list[Job] = []
    problems: list[str] = []
    for i, point in enumerate(points):
        label = (
            f"job {i + 1}/{len(points)} ({shlex.join(point) or 'no overrides'}): " if len(points) > 1 else ""
        )
        try:
            cfg = compose_config(point, config_name=config_name)
            paths = absolute_path_overrides(cfg, submit_dir)
            overrides = [o for o in point if _key(o) not in paths] + list(paths.values())
            if paths:
                cfg = compose_config(overrides, config_name=config_name)
            validate_for_submit(cfg)
        except ConfigError as err:
            problems.append(label + str(err))
            continue
        except (HydraException, OmegaConfBaseException) as err:
            problems.append(label + f"cannot compose the config: {err}")
            continue
        jobs.append(Job(overrides, cfg))
    run_ids = [job for job in jobs if job.cfg.run.id is not None]
    if len(points) > 1 and run_ids:
        problems.append(
            "invalid config:\n  run.id: one run.id for a sweep of several jobs would make them share "
            "one run dir; leave it unset: each job's SLURM job id is its run id "
            f"(got {run_ids[0].cfg.run.id!r})"
        )
    return jobs, problems


def default_sbatch_dir(cfg: DictConfig, submit_dir: Path) -> Path:
    output_dir = Path(str(cfg.paths.output_dir)).expanduser()
    output_dir = output_dir if output_dir.is_absolute() else submit_dir / output_dir
    return output_dir / str(cfg.experiment_name) / "sbatch" / timestamp()


def render_all(
    jobs: list[Job], args: argparse.Namespace, sbatch_dir: Path, submit_dir: Path, command: str
) -> list[str]:
    """Fill in each job's script and path; returns problems (a cluster.setup line bash cannot parse)."""
    problems = []
    for i, job in enumerate(jobs):
        header = (
            f"Generated by xmodal-submit on {datetime.now().isoformat(timespec='seconds')} "
            f"(job {i + 1} of {len(jobs)})\nsubmit dir: {submit_dir}\n"
            f"command: {command}\noverrides: {shlex.join(job.overrides) or '(none)'}"
        )
        job.script = render_sbatch(
            job.cfg,
            job.overrides,
            submit_dir=submit_dir,
            log_dir=sbatch_dir / "logs",
            config_name=args.config_name,
            header=header,
        )
        job.path = sbatch_dir / f"job_{i:03d}.sbatch"
        error = bash_syntax_error(job.script)
        if error:
            problems.append(
                f"invalid config:\n  cluster.setup: the rendered script is not valid bash: {error} "
                f"(got {list(job.cfg.cluster.setup)!r})"
            )
    return problems


def write_scripts(jobs: list[Job], sbatch_dir: Path) -> None:
    (sbatch_dir / "logs").mkdir(parents=True, exist_ok=True)
    for job in jobs:
        assert job.path is not None
        job.path.write_text(job.script)
        job.path.chmod(0o755)


def submit(jobs: list[Job], sbatch: str, sbatch_dir: Path) -> int:
    """``sbatch --parsable`` each script; never waits for a job. Prints '<job id>\\t<overrides>'."""
    for n, job in enumerate(jobs):
        try:
            result = subprocess.run(
                [sbatch, "--parsable", str(job.path)], capture_output=True, text=True, timeout=300
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            result = subprocess.CompletedProcess([sbatch], 1, "", str(err))
        job_id = result.stdout.strip().split(";")[0] if result.returncode == 0 else ""
        if not job_id:
            print_error(
                f"sbatch failed for {job.path} (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()}\n"
                f"{n} of {len(jobs)} jobs were submitted before it (listed above and in {sbatch_dir}/jobs.tsv)"
            )
            return 1
        print(f"{job_id}\t{shlex.join(job.overrides)}", flush=True)
        with open(sbatch_dir / "jobs.tsv", "a") as f:
            f.write(f"{job_id}\t{job.path.name}\t{shlex.join(job.overrides)}\n")
    print(f"{len(jobs)} job(s) submitted; scripts, jobs.tsv and logs/ in {sbatch_dir}", file=sys.stderr)
    return 0


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    submit_dir = Path.cwd()
    points = expand_sweep(args.overrides, args.multirun)
    jobs, problems = prepare(points, args.config_name, submit_dir)
    if problems:
        for problem in problems:
            print_error(problem)
        return 2
    sbatch = shutil.which("sbatch")
    if sbatch is None and not args.dry_run:
        raise SubmitError(
            "sbatch not found on PATH: run xmodal-submit on a SLURM login node, "
            "or add --dry-run to print the scripts without submitting"
        )
    sbatch_dir = args.sbatch_dir.expanduser().resolve() if args.sbatch_dir else None
    sbatch_dir = sbatch_dir or default_sbatch_dir(jobs[0].cfg, submit_dir)
    command = shlex.join(["xmodal-submit", *(sys.argv[1:] if argv is None else argv)])
    problems = render_all(jobs, args, sbatch_dir, submit_dir, command)
    if problems:
        for problem in problems:
            print_error(problem)
        return 2
    if args.dry_run:
        if args.sbatch_dir is not None:
            write_scripts(jobs, sbatch_dir)
        for i, job in enumerate(jobs):
            where = job.path if args.sbatch_dir is not None else f"{job.path} (not written)"
            print(f"# ===== job {i + 1} of {len(jobs)}: {where} =====")
            print(job.script)
        print(f"dry run: {len(jobs)} script(s), nothing submitted", file=sys.stderr)
        return 0
    write_scripts(jobs, sbatch_dir)
    assert sbatch is not None
    return submit(jobs, sbatch, sbatch_dir)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except SubmitError as err:
        print_error(str(err))
        return 2


if __name__ == "__main__":
    sys.exit(main())
