"""How a GAN is sharded under ``trainer=fsdp2``: G, D and the EMA copy each one FSDP2 unit.

Under bf16-mixed the parameters are gathered in bf16 and gradients reduced in fp32. The nets'
FSDP2-specific details (spectral norm's buffers, batch norm statistics in fp32, the EMA update on
sharded tensors) are handled in xmodal/nn/gan.py, xmodal/nn/fusion.py (the norms) and, for the
EMA, in xmodal/nn/ema.py.
"""

from __future__ import annotations

from typing import Any

from xmodal.tasks.adversarial import shard_each


def parallelize_gan(task: Any, mesh: Any) -> None:
    shard_each(task, (task.generator, task.discriminator, task.ema), mesh)
