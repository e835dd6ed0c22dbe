"""The learning-rate schedule the automatic-optimization tasks (caption, vae) share."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier per step: linear warm-up (at most a tenth of the run), then cosine decay to
    10 % of the peak at the last step."""
    total = max(total_steps, 1)
    warmup = min(warmup_steps, max(total // 10, 1))

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def with_warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> dict[str, Any]:
    """``configure_optimizers``' return value: the optimizer and the schedule, stepped per step."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
