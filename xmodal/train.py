"""xmodal-train: fit (then test) one run; ``-m`` for Hydra sweeps.

xmodal-train                                  # default experiment on built-in data, CPU or GPU
xmodal-train trainer=ddp_cpu data.batch_size=32
xmodal-train run.id=my-run                    # again later: resumes checkpoints/last.ckpt
xmodal-train -m model.lr=1e-3,3e-4            # one run dir (and W&B run) per job

Exit status (README "When things go wrong"): 0 finished; 1 crashed (a traceback); 2 refused: a
config, usage or drift error, or no intact checkpoint to resume (nothing trained); 3 stopped by a
signal after saving (rerun the printed command, or let SLURM's requeue do it); 4 diverged:
``run.max_nonfinite_steps`` non-finite steps in a row; 5 the run dir is held by another live job.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from xmodal import summary
from xmodal.callbacks.metrics_file import scalar_metrics
from xmodal.callbacks.nonfinite import NonFiniteGuard, NonFiniteStop
from xmodal.callbacks.preemption import Preemption
from xmodal.callbacks.progress import StepCounter, target_steps
from xmodal.checkpoints import NoIntactCheckpoint, checkpoint_problem, choose_resume
from xmodal.config import CONFIG_DIR, ConfigError, absolute, register_schemas, validate, world_size
from xmodal.config.view import shown_config
from xmodal.console import (
    log_to_console_if_unconfigured,
    log_to_file,
    print_config_tree,
    print_error,
    stop_logging_to,
)
from xmodal.drift import check_drift, world_size_note
from xmodal.factory import (
    build_callbacks,
    build_datamodule,
    build_loggers,
    build_task,
    build_trainer,
    prepare_data,
)
from xmodal.files import write_json_atomic
from xmodal.metrics.provenance import read_provenance
from xmodal.registry import RegistryError
from xmodal.run import (
    decide_run,
    export_run_id,
    forget_run_id,
    is_launcher,
    write_provenance,
)
from xmodal.run_lock import RunBusy, RunLock
from xmodal.tasks.config import task_config
from xmodal.tokenizers.base import Tokenizer
from xmodal.tokenizers.build import tokenizer_from_state
from xmodal.warnings_filter import install_warning_filters, quiet_wandb_init

log = logging.getLogger("xmodal")

EXIT_REFUSED = 2
EXIT_STOPPED = 3
EXIT_DIVERGED = 4
EXIT_BUSY = 5


class RunStopped(Exception):
    """Fit ended early on a stop or requeue signal, after saving: the message says how to resume.

    ``preemption`` holds a pending SLURM requeue, run by the caller as its last act (after
    ``train``'s cleanup has flushed the loggers and finished W&B)."""

    def __init__(self, message: str, preemption: Preemption | None = None):
        super().__init__(message)
        self.preemption = preemption


def job_overrides() -> list[str]:
    """This job's own overrides: a multirun job's values (``model.lr=1e-3``), not the sweep's
    ``-m model.lr=1e-3,3e-4``; outside Hydra, the command line's arguments."""
    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    return [a for a in sys.argv[1:] if not a.startswith("-")]


def resume_command(run_id: str) -> str:
    """This invocation again, pinned to its run id (a rerun with the same id resumes it)."""
    return summary.resume_command(run_id, job_overrides(), os.getcwd())


def failure_note(run_id: str, run_dir: Path, step: int) -> str:
    """What a run that ended without finishing leaves behind (divergence, a crash): where, which
    checkpoints survive, and the command that resumes from the newest."""
    kept = [n for n in ("last.ckpt", "last.prev.ckpt", "best.ckpt") if (run_dir / "checkpoints" / n).exists()]
    if kept:
        then = f"checkpoints kept: {', '.join(kept)}; rerun to resume from the newest"
    else:
        then = "no checkpoint written yet; rerun to start again"
    return f"run {run_id} ended at step {step} without finishing; run dir: {run_dir}; {then}: {resume_command(run_id)}"


def stop_cause(preemption: Preemption) -> str:
    received = preemption.requested
    return f"{signal.Signals(received).name}" if received is not None else "a stop signal to another rank"


def stop_message(preemption: Preemption, step: int, run_id: str) -> str:
    cause = stop_cause(preemption)
    saved = "checkpoint saved" if preemption.saved else "state not sound, the last good checkpoint kept"
    requeue = preemption.requeue_job is not None
    how = "SLURM requeues the job, it resumes by itself; by hand" if requeue else "resume with"
    return f"stopped by {cause} at step {step} ({saved}); {how}: {resume_command(run_id)}"


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def check_launch(cfg: DictConfig) -> None:
    """Refuse launches that Lightning would silently get wrong."""
    # Under a SLURM launcher (submitit) srun starts every rank itself: nothing is re-run.
    if _in_multirun() and world_size(cfg) > 1 and is_launcher() and "SLURM_PROCID" not in os.environ:
        raise ConfigError(
            "invalid config:\n  trainer.devices: a local multirun (-m) cannot start multi-process jobs: "
            "Lightning's DDP launcher re-runs the whole sweep in every child. Run one job per point "
            "without -m, or use a SLURM launcher that starts one srun task per device "
            f"(got devices × nodes = {world_size(cfg)})"
        )


def load_or_fit_tokenizer(run_dir: Path, datamodule: Any) -> Tokenizer:
    """A rerun of a run keeps its tokenizer (the state in ``tokenizer.json``; a bare ``{"vocab"}``
    from older runs is a word tokenizer); a new run fits ``data.tokenizer`` on the training captions."""
    path = run_dir / "tokenizer.json"
    if path.exists():
        tokenizer = tokenizer_from_state(json.loads(path.read_text(encoding="utf-8")))
        datamodule.tokenizer = tokenizer
        return tokenizer
    tokenizer = datamodule.build_tokenizer()
    if is_launcher():
        write_json_atomic(path, tokenizer.state())
    return tokenizer


def finish_wandb(failed: bool) -> None:
    """Close the W&B run even on failure, so a multirun's next job opens its own run."""
    if "wandb" not in sys.modules:
        return
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)


def release_process_group() -> None:
    """Destroy the default process group once a run has finished well.

    Lightning leaves it alive. A process that then exits with gloo's worker threads still holding
    work objects can die in interpreter teardown with SIGABRT ("terminate called without an active
    exception", pytorch/pytorch#179291): seen now and then on 2 CPU ranks under load. Only after
    success: a rank that failed may have left its peers inside a collective, and destroying the group
    then can hang instead of exiting (pytorch/torchtitan#1342).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def test_best_checkpoint(
    cfg: DictConfig, trainer: L.Trainer, checkpoint: Any, task: Any, tokenizer: Tokenizer, datamodule: Any
) -> dict[str, float]:
    """Test metrics of the best checkpoint (of the trained weights when none was saved)."""
    best = checkpoint.best_model_path or None
    # A fresh module receives the best weights: a module sharded by FSDP2 during fit cannot be
    # moved or re-sharded for a second stage.
    test_task = build_task(cfg, tokenizer) if best else task
    # Testing needs no optimizer; ModelParallelStrategy would try to load the fit-time optimizers'
    # states into the fresh module (KeyError in torch's get_optimizer_state_dict).
    trainer.strategy.optimizers = []
    trainer.test(test_task, datamodule=datamodule, ckpt_path=best)
    metrics = scalar_metrics(trainer.callback_metrics, "test/")
    # The best weights are loaded into test_task now: the compositional split reuses them.
    return {**metrics, **evaluate_holdout(trainer, test_task, datamodule)}


def evaluate_holdout(trainer: L.Trainer, task: Any, datamodule: Any) -> dict[str, float]:
    """Metrics on the ``holdout`` split (shapes' unseen colour–kind pairs), logged as ``holdout/...``,
    for tasks that test it (``tests_holdout``); {} when the data has no such split."""
    if not task.tests_holdout or "holdout" not in datamodule.data.splits:
        return {}
    task.test_prefix = "holdout"
    try:
        trainer.test(task, dataloaders=datamodule.loader("holdout", datamodule.topology()))
    finally:
        task.test_prefix = "test"
    return scalar_metrics(trainer.callback_metrics, "holdout/")


def report_run(
    cfg: DictConfig,
    run_dir: Path,
    trainer: L.Trainer,
    record: dict[str, Any],
    wall_s: float,
    stopped: str | None,
) -> None:
    """Print the end-of-run summary (best checkpoint, test metrics, next commands) and write it into
    the run dir as ``summary.json`` / ``summary.txt``; ``record`` is what ``metrics.json`` holds."""
    outcome = summary.RunOutcome(
        run_id=cfg.run.id,
        run_dir=run_dir,
        wall_time_s=wall_s,
        steps=int(StepCounter(target_steps(cfg.trainer)).done(trainer)),
        max_steps=target_steps(cfg.trainer),
        global_step=trainer.global_step,
        monitor=cfg.callbacks.monitor,
        best_score=record["best_score"],
        best_checkpoint=record["best_checkpoint"],
        test=record.get("test"),
        skipped=record["data_skipped"],
        stop_reason=stopped,
        argv=job_overrides(),
        cwd=os.getcwd(),
        generate_args=summary.generate_args(task_config(cfg), dict(cfg.data.roles), run_dir / "generated"),
    )
    log.info("%s", summary.write_summary(run_dir, summary.build_summary(outcome)).rstrip())


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit and test one run described by a composed config; returns its final metrics."""
    started = time.monotonic()
    install_warning_filters()  # after Lightning's import (above): its import-time filters come later in the list
    validate(cfg)
    check_launch(cfg)
    launcher = is_launcher()
    run = decide_run(cfg.run.id, absolute(cfg.paths.output_dir), cfg.experiment_name)
    with open_dict(cfg):
        cfg.run.id, cfg.run.dir = run.id, str(run.dir)
    handler = None
    console_handler = log_to_console_if_unconfigured() if launcher else None
    trainer: L.Trainer | None = None
    failed = True
    lock = RunLock(run.dir) if launcher else None  # ranks started after the launcher share its hold
    try:
        # Refusals first, before anything is written into the run dir.
        changes = []
        if lock is not None:
            lock.acquire()
            changes = check_drift(run.dir, cfg)
        if cfg.ckpt_path is not None and (problem := checkpoint_problem(absolute(cfg.ckpt_path))):
            raise ConfigError(f"invalid config:\n  ckpt_path: {cfg.ckpt_path} is {problem}")
        resume = choose_resume(run.dir, move_corrupt=launcher) if cfg.run.resume else None
        if launcher:
            export_run_id(run.id)
            write_provenance(run.dir, OmegaConf.to_yaml(cfg, resolve=True), changes)
            print_config_tree(cfg, save_to=run.dir / "config_tree.log", shown=shown_config(cfg))
            handler = log_to_file(run.dir / "train.log")
            if _in_multirun():
                (Path(HydraConfig.get().runtime.output_dir) / "run_dir.txt").write_text(f"{run.dir}\n")
        L.seed_everything(cfg.seed, workers=True)
        datamodule = build_datamodule(cfg, prepare_data(cfg))
        tokenizer = load_or_fit_tokenizer(run.dir, datamodule)
        task = build_task(cfg, tokenizer)
        if resume is not None and launcher:
            log.info("resuming run %s from %s", run.id, resume)
        for change in changes:
            log.info("config changed on resume: %s", change)
        if launcher and (note := world_size_note(changes)):
            log.warning(note)
        loggers = build_loggers(cfg, run)
        quiet_wandb_init(loggers)
        callbacks, checkpoint = build_callbacks(cfg, run, has_logger=bool(loggers))
        trainer = build_trainer(cfg, run, loggers, callbacks)
        start_from = resume or cfg.ckpt_path
        trainer.fit(task, datamodule=datamodule, ckpt_path=str(start_from) if start_from else None)
        preemption = next(c for c in callbacks if isinstance(c, Preemption))
        metrics: dict[str, float] = scalar_metrics(trainer.callback_metrics, "val/")
        record: dict[str, Any] = {
            "run_id": run.id,
            "global_step": trainer.global_step,
            "val": dict(metrics),
            "best_checkpoint": checkpoint.best_model_path or None,
            "best_score": float(checkpoint.best_model_score)
            if checkpoint.best_model_score is not None
            else None,
            "monitor": cfg.callbacks.monitor,
            "preempted": preemption.preempted,
            "nonfinite_steps": next(c for c in callbacks if isinstance(c, NonFiniteGuard)).total,
        }
        if cfg.test_after_fit and not preemption.preempted:
            record["test"] = test_best_checkpoint(cfg, trainer, checkpoint, task, tokenizer, datamodule)
            metrics.update(record["test"])
        record["data_skipped"] = datamodule.skipped()
        record["data_errors"] = datamodule.errors()
        if provenance := read_provenance(run.dir):  # what each FID/judge/cycle score was measured with
            record["provenance"] = provenance
        if trainer.is_global_zero:
            write_json_atomic(run.dir / "metrics.json", record)
            stopped = stop_cause(preemption) if preemption.preempted else None
            report_run(cfg, run.dir, trainer, record, time.monotonic() - started, stopped)
        release_process_group()
        failed = False
        if preemption.preempted:
            raise RunStopped(stop_message(preemption, trainer.global_step, run.id), preemption)
        return metrics
    finally:
        finish_wandb(failed)
        if failed and trainer is not None and launcher:
            log.error("%s", failure_note(run.id, run.dir, trainer.global_step))
        if handler is not None:
            stop_logging_to(handler)
        if console_handler is not None:
            stop_logging_to(console_handler)
        if launcher:
            forget_run_id()
        if lock is not None:
            lock.release()


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except (ConfigError, NoIntactCheckpoint) as err:
        print_error(str(err))
        sys.exit(EXIT_REFUSED)
    except RunBusy as err:
        print_error(str(err))
        sys.exit(EXIT_BUSY)
    except NonFiniteStop as err:
        print_error(str(err))
        sys.exit(EXIT_DIVERGED)
    except RunStopped as err:
        # Only the launcher reports the stop: a rank exiting non-zero first would make Lightning's
        # process observer, or srun --kill-on-bad-exit, kill the launcher while it still writes.
        if not is_launcher():
            sys.exit(0)
        print(f"xmodal: {err}", file=sys.stderr, flush=True)
        if err.preemption is not None:
            err.preemption.requeue()  # the last act: SLURM SIGTERMs this step right after
        sys.exit(EXIT_STOPPED)
    # A sweeper (e.g. Optuna) optimises the returned value.
    return metrics.get(cfg.callbacks.monitor)


def main() -> None:
    try:
        register_schemas()  # imports plug-ins: a broken one is named in one line
    except RegistryError as err:
        print_error(str(err))
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
