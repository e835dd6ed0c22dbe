"""Throughput and model FLOPs utilisation, logged to every logger as ``perf/*``.

- ``perf/samples_per_s``: training samples per second over all ranks, between logged steps;
- ``perf/flops_per_step``: FLOPs of one whole training step (forward, backward; the GAN's D and G
  steps together) summed over ranks, counted once with torch's own FLOP formulas
  (``torch.utils.flop_counter.flop_registry``) on the step after the first (the first carries
  one-off set-up work). It counts matmuls, convolutions and attention, as MFU conventions do, not
  element-wise work;
- ``perf/mfu``: achieved FLOP/s per device over the device's dense bf16/fp16 tensor-core peak, on a
  known GPU under 16-bit precision only (other precisions or CPUs have no comparable peak).
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' data sheets, FLOP/s.
PEAK_16BIT_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 125e12,
    "V100": 125e12,
}


def device_peak_flops(precision: str) -> float | None:
    """The current CUDA device's 16-bit peak, or None (a CPU, an unknown GPU, 32-bit precision)."""
    if not torch.cuda.is_available() or not str(precision).startswith(("16", "bf16")):
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_16BIT_FLOPS.items() if key in name), None)


class FlopCount(TorchDispatchMode):
    """Total FLOPs of the aten ops run inside it, by torch's FLOP formulas.

    Not ``FlopCounterMode``: its per-module tracker hooks autograd's engine, and a gradient
    penalty's ``autograd.grad`` inside the counted step (WGAN-GP) then fails with "A leaf node was
    passed to _will_engine_execute_node"; a total needs no module breakdown."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def batch_rows(batch: Any) -> int:
    if isinstance(batch, dict):
        if "__key__" in batch:
            return len(batch["__key__"])
        first = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
        return int(first.shape[0]) if first is not None else 0
    return 0


class Throughput(L.Callback):
    def __init__(self, count_at_batch: int = 1):
        self.count_at_batch = count_at_batch
        self.flops_per_step: float | None = None
        self._counter: FlopCount | None = None
        self._window: tuple[float, int] | None = None  # (start time, rows since)
        self._batches = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.flops_per_step is None and self._batches == self.count_at_batch:
            self._counter = FlopCount()
            self._counter.__enter__()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.monotonic()
        self._batches += 1
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops_per_step = float(self._counter.total) * trainer.world_size
            self._counter = None
            self._window = None  # the counted step ran slowly: time from the next one
            return
        rows = batch_rows(batch) * trainer.world_size
        if self._window is None:
            self._window = (now, 0)
            return
        start, seen = self._window
        seen += rows
        every = max(trainer.log_every_n_steps, 1)
        if trainer.global_step % every or now <= start:
            self._window = (start, seen)
            return
        steps_per_s_rows = seen / (now - start)
        metrics = {"perf/samples_per_s": steps_per_s_rows}
        if self.flops_per_step is not None and batch_rows(batch):
            steps_per_s = steps_per_s_rows / (batch_rows(batch) * trainer.world_size)
            metrics["perf/flops_per_step"] = self.flops_per_step
            peak = device_peak_flops(trainer.precision)
            if peak:
                metrics["perf/mfu"] = self.flops_per_step / trainer.world_size * steps_per_s / peak
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=batch_rows(batch))
        self._window = (now, 0)
