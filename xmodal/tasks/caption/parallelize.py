"""How a captioner is sharded under ``trainer=fsdp2`` (FSDP2 ``fully_shard`` on the data-parallel mesh).

Each decoder layer is its own unit (its parameters are gathered just before it runs), then the
encoder, then the rest of the decoder (embeddings, tied output head, final norm).
"""

from __future__ import annotations

from typing import Any


def parallelize_caption(task: Any, mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in getattr(task.decoder, "layers", ()):
        fully_shard(layer, mesh=mesh)
    fully_shard(task.encoder, mesh=mesh)
    fully_shard(task.decoder, mesh=mesh)
