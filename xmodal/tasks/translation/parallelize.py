"""How a translator is sharded under ``trainer=fsdp2``: G and D each one FSDP2 unit.

Under bf16-mixed the parameters are gathered in bf16 and gradients reduced in fp32. The nets use
group norm (no running statistics to keep in fp32) and no spectral norm, so nothing else needs care.
"""

from __future__ import annotations

from typing import Any

from xmodal.tasks.adversarial import shard_each


def parallelize_translation(task: Any, mesh: Any) -> None:
    shard_each(task, (task.generator, task.discriminator), mesh)
