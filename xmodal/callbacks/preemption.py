"""SLURM preemption: on the requeue signal, checkpoint at the next step boundary, requeue, stop.

Why not Lightning's own handler: it saves ``hpc_ckpt_N.ckpt`` from inside the signal handler, at
whatever point of the step the signal lands, never stops training (the job is then killed at the
time limit) and cannot agree with the other ranks on where to stop. Here the handler only sets a
flag; at the end of the next training batch all ranks agree (any rank signalled → all stop), the
complete state — model, optimizers, schedulers, loop counters and the data stream position — is
written to ``checkpoints/last.ckpt`` atomically (``LastCheckpoint``), rank zero runs
``scontrol requeue <job>``, and fit ends. The requeued job has the same SLURM job id, hence the same
run id and run dir, and resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from typing import Any

import lightning as L

from xmodal.callbacks.last_checkpoint import LastCheckpoint

log = logging.getLogger("xmodal")


def slurm_job_id() -> str | None:
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


class Preemption(L.Callback):
    def __init__(self, last: LastCheckpoint, requeue_signal: signal.Signals = signal.SIGUSR2):
        self.last = last
        self.requeue_signal = requeue_signal
        self.requested = False
        self.preempted = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True  # only a flag: the work happens at a step boundary

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._previous = signal.signal(self.requeue_signal, self._handler)

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self._previous is not None:
            signal.signal(self.requeue_signal, self._previous)
            self._previous = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        self.preempted = True
        self.last.save(trainer)
        job = slurm_job_id()
        if trainer.is_global_zero and job is not None:
            result = subprocess.run(["scontrol", "requeue", job], check=False)
            if result.returncode == 0:
                log.info(
                    "preempted at step %d: checkpoint saved, SLURM job %s requeued", trainer.global_step, job
                )
            else:
                log.warning("scontrol requeue %s failed with exit code %d", job, result.returncode)
        elif trainer.is_global_zero:
            log.info(
                "stop signal at step %d: checkpoint saved (not under SLURM: nothing requeued)",
                trainer.global_step,
            )
        trainer.should_stop = True
        # Lightning validates once more when a fit stops early; the grace period before the kill
        # is for saving, and the requeued job validates on schedule anyway.
        trainer.limit_val_batches = 0
