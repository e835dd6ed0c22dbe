"""Progress toward ``trainer.max_steps`` with rate and ETA, whatever the output is.

Rich's bar redraws one line in place: with output redirected to a file (nohup, ``tee``, a SLURM
``.out``) nothing readable arrives until the end, and its "Epoch 0/-2" (max_epochs=-1) says nothing
about ``max_steps``. So:

- on a terminal, the Rich bar shows ``step 250/1000`` and an ETA beside its metrics;
- otherwise, a plain log line every ``interval_s`` seconds (``step 250/1000 (25%) · 8.1 steps/s ·
  ETA 1m32s · train/loss 0.412``), also during validation, through the ``xmodal`` logger (stdout
  and ``train.log``).

Steps are counted in the units of the user's ``trainer.max_steps`` (a GAN counts iterations while
Lightning counts optimizer steps): the task's ``sample_step`` where it has one (a GAN's iterations:
its G-only warm-up iterations take one optimizer step, the rest n_critic + 1), else
``done = global_step × max_steps / trainer.max_steps``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar

log = logging.getLogger("xmodal")


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def target_steps(trainer_cfg: Any) -> int:
    """The steps a run is asked for, in the user's units: ``trainer.max_steps``, or under
    ``trainer.fast_dev_run`` its batch count (Lightning then stops after those, whatever
    ``max_steps`` says, so "step 1000/1000" would be false)."""
    fast = trainer_cfg.get("fast_dev_run", 0)
    return int(fast) if fast else int(trainer_cfg.max_steps)


class StepCounter:
    """Steps done in the user's units, and the rate over this process's steps (not resumed ones)."""

    def __init__(self, max_steps: int):
        self.max_steps = max_steps
        self._start: tuple[float, float] | None = None

    def done(self, trainer: L.Trainer) -> float:
        own_count = getattr(getattr(trainer, "lightning_module", None), "sample_step", None)
        if own_count is not None:
            return min(float(own_count), float(self.max_steps)) if self.max_steps > 0 else float(own_count)
        lightning_max = trainer.max_steps
        if lightning_max and lightning_max > 0 and self.max_steps > 0:
            # Capped: under fast_dev_run a GAN iteration is 2 optimizer steps of Lightning's 1.
            return min(trainer.global_step * self.max_steps / lightning_max, float(self.max_steps))
        return float(trainer.global_step)

    def start(self, trainer: L.Trainer) -> None:
        self._start = (time.monotonic(), self.done(trainer))

    def rate(self, trainer: L.Trainer) -> float | None:
        """Steps per second since ``start``; None before the first step of this process."""
        if self._start is None:
            return None
        seconds, steps = time.monotonic() - self._start[0], self.done(trainer) - self._start[1]
        return steps / seconds if steps > 0 and seconds > 0 else None

    def eta(self, trainer: L.Trainer) -> str:
        rate = self.rate(trainer)
        if rate is None or self.max_steps <= 0:
            return "?"
        return format_duration((self.max_steps - self.done(trainer)) / rate)

    def label(self, trainer: L.Trainer) -> str:
        total = f"/{self.max_steps}" if self.max_steps > 0 else ""
        return f"{int(self.done(trainer))}{total}"


class StepProgress(L.Callback):
    """Plain progress lines every ``interval_s`` seconds (rank zero), for output that is not a terminal."""

    def __init__(self, max_steps: int, interval_s: float = 30.0):
        self.counter = StepCounter(max_steps)
        self.interval_s = interval_s
        self._last = -float("inf")

    def _due(self, trainer: L.Trainer) -> bool:
        now = time.monotonic()
        if not trainer.is_global_zero or now - self._last < self.interval_s:
            return False
        self._last = now
        return True

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.counter.start(trainer)
        if trainer.is_global_zero:
            log.info("training: step %s", self.counter.label(trainer))
            self._last = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        if self._due(trainer):
            log.info("%s", self.line(trainer))

    def line(self, trainer: L.Trainer) -> str:
        c = self.counter
        parts = [f"step {c.label(trainer)}"]
        if c.max_steps > 0:
            parts[0] += f" ({c.done(trainer) / c.max_steps:.0%})"
        rate = c.rate(trainer)
        if rate is not None:
            parts += [f"{rate:.3g} steps/s", f"ETA {c.eta(trainer)}"]
        losses = {k: v for k, v in trainer.progress_bar_metrics.items() if "loss" in k}
        parts += [f"{k} {float(v):.4g}" for k, v in sorted(losses.items())[:2]]
        return " · ".join(parts)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or not self._due(trainer):
            return
        totals = trainer.num_val_batches if trainer.state.fn == "fit" else trainer.num_test_batches
        total = totals[dataloader_idx] if dataloader_idx < len(totals) else "?"
        what = "validating" if trainer.state.fn == "fit" else str(trainer.state.stage.value)
        log.info("%s: batch %d/%s (at step %s)", what, batch_idx + 1, total, self.counter.label(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.is_global_zero:
            log.info("%s", self.line(trainer))


class StepRichProgressBar(RichProgressBar):
    """Rich's bar with ``step`` (toward ``max_steps``) and ``eta`` beside its metrics."""

    def __init__(self, max_steps: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.counter = StepCounter(max_steps)

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        self.counter.start(trainer)

    def get_metrics(self, trainer: L.Trainer, pl_module: Any) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        return {"step": self.counter.label(trainer), "eta": self.counter.eta(trainer), **metrics}
