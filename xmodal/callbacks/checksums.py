"""Per-rank parameter checksums, to prove (or catch the loss of) replica consistency under DDP."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch


def parameter_digest(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter's bytes, in name order: equal only for bit-identical weights."""
    digest = hashlib.sha256()
    for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
        digest.update(name.encode())
        tensor = param.detach()
        tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # FSDP2 DTensor
        digest.update(tensor.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class RankChecksums(L.Callback):
    """Every rank writes ``<dir>/rank<N>.json`` with its digest at the start and the end of fit."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.start: str | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.start = parameter_digest(pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "start": self.start,
            "end": parameter_digest(pl_module),
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(payload, indent=2))
