"""Exponential moving average of a network's weights (our own: Lightning's WeightAveraging
averages the whole LightningModule and does not work on sharded modules). The GAN keeps an EMA
generator with it; every other task gets one through xmodal/callbacks/ema.py."""

from __future__ import annotations

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 DTensor (the tensor itself otherwise): EMA and model are sharded
    alike, so shard-wise averaging is the full average."""
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema ← decay·ema + (1−decay)·model`` for parameters; buffers (BN statistics, spectral-norm
    vectors) are copied, as they describe the current weights rather than a trajectory."""
    for module in (ema, model):
        # FSDP2 keeps a root module's parameters unsharded after a forward without backward (the
        # EMA after sampling, G after the D steps): back to shards, so both hold DTensor shards.
        if hasattr(module, "reshard"):
            module.reshard()
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e_local, p_local = _local(e), _local(p)
        if decay == 0.0:
            e_local.copy_(p_local)
        else:
            e_local.lerp_(p_local.to(e_local.dtype), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        _local(e).copy_(_local(b))


def ema_decay(decay: float, step: int, start: int) -> float:
    """EMA decay at a step: 0 (copy the weights) before ``start``, then ``min(decay, (1+t)/(10+t))``
    with t the steps since ``start``: a fixed 0.999 would keep >50 % of the random init for the
    first ~700 steps, i.e. for a whole short CPU run."""
    if step < start:
        return 0.0
    t = step - start
    return min(decay, (1 + t) / (10 + t))
