"""How a VAE is sharded under ``trainer=fsdp2``: condition encoder, conditional prior, encoder and decoder each one FSDP2 unit."""

from __future__ import annotations

from typing import Any


def parallelize_vae(task: Any, mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    if task.condition is not None:
        fully_shard(task.condition, mesh=mesh)
    if task.prior is not None:
        fully_shard(task.prior, mesh=mesh)
    fully_shard(task.encoder, mesh=mesh)
    fully_shard(task.decoder, mesh=mesh)
