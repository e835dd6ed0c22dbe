"""Preemption: on SIGUSR2 (requeue) or SIGTERM (stop), checkpoint at the next step boundary and stop.

Why not Lightning's own handler: it saves ``hpc_ckpt_N.ckpt`` from inside the signal handler, at
whatever point of the step the signal lands, never stops training (the job is then killed at the
time limit) and cannot agree with the other ranks on where to stop. Here the handler only sets a
flag; at the end of the next training batch all ranks agree (any rank signalled → all stop), the
complete state — model, optimizers, schedulers, loop counters and the data stream position — is
written to ``checkpoints/last.ckpt`` atomically (``LastCheckpoint``, unless the state is not
sound: see ``save_refusal``) and fit ends. For SIGUSR2 under SLURM rank zero then runs
``scontrol requeue <job>`` (:meth:`Preemption.requeue`), but only as the very last act of the
process, once metrics are written, loggers flushed and the W&B run finished (xmodal/train.py):
SLURM answers a requeue by SIGTERMing the whole step, and a requeue issued at the checkpoint killed
W&B's service mid-run (a ``ConnectionResetError`` traceback, final records lost). The requeued job
has the same SLURM job id, hence the same run id and run dir, and resumes from that checkpoint.
SIGTERM (a cancelled job, a stopping container) saves the same way and is not requeued.
"""

from __future__ import annotations

import logging
import signal
import subprocess
from typing import Any

import lightning as L

from xmodal.callbacks.last_checkpoint import LastCheckpoint
from xmodal.run import slurm_run_id

log = logging.getLogger("xmodal")


class Preemption(L.Callback):
    def __init__(self, last: LastCheckpoint, requeue_signal: signal.Signals = signal.SIGUSR2):
        self.last = last
        self.requeue_signal = requeue_signal
        self.requested: int | None = None  # the signal received, if any
        self.preempted = False
        self.requeue_job: str | None = None
        """The SLURM job to requeue at the end of the process (rank zero, on the requeue signal)."""
        self.requeued = False
        """Whether ``scontrol requeue`` accepted this job: it then resumes by itself."""
        self.saved = False
        """Whether the stop wrote a checkpoint (an unsound state is not saved: the last one stays)."""
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = signum  # only a flag: the work happens at a step boundary

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        # After Lightning installed its handlers (they come after on_fit_start): ours replace its
        # SIGTERM handler for the fit, which would raise and stop the ranks without saving. They
        # also replace any SIGUSR2 handler already there (submitit's, under Hydra's submitit
        # launcher); on_fit_end puts the previous handlers back.
        for sig in (self.requeue_signal, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handler)

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.requested is not None, all=False):
            return
        self.preempted = True
        self.saved = self.last.save_if_sound(trainer) or self.last.saved_step == trainer.global_step
        requeue = trainer.strategy.reduce_boolean_decision(self.requested == self.requeue_signal, all=False)
        job = slurm_run_id()  # the SLURM job, as scontrol names it
        if trainer.is_global_zero and requeue and job is not None:
            self.requeue_job = job  # not now: SLURM would kill this step before W&B is finished
            log.info(
                "preempted at step %d: checkpoint saved, SLURM job %s requeued on exit",
                trainer.global_step,
                job,
            )
        elif trainer.is_global_zero:
            log.info("stop signal at step %d: checkpoint saved, not requeued", trainer.global_step)
        trainer.should_stop = True
        # Lightning validates once more when a fit stops early; the grace period before the kill
        # is for saving, and the requeued job validates on schedule anyway.
        trainer.limit_val_batches = 0

    def requeue(self) -> bool:
        """Run ``scontrol requeue`` for the pending job, if any; True when SLURM accepted it.

        Call it last (after every logger is flushed and W&B finished): SLURM then ends this job's
        step with SIGTERM, and nothing after this call may be relied on to run."""
        if self.requeue_job is None:
            return False
        job, self.requeue_job = self.requeue_job, None
        try:
            result = subprocess.run(["scontrol", "requeue", job], check=False)
        except OSError as error:  # no scontrol on PATH
            log.warning("scontrol requeue %s failed (%s): resume by hand with the command above", job, error)
            return False
        self.requeued = result.returncode == 0
        if not self.requeued:
            log.warning(
                "scontrol requeue %s failed with exit code %d: resume by hand with the command above",
                job,
                result.returncode,
            )
        return self.requeued
