"""A plug-in written outside the package, as a user would: a modality and a task, registered by
``register()`` (called directly, or through an ``xmodal.plugins`` entry point).

- ``vector`` modality: ``key.vec`` members holding comma-separated floats → float ``[D]``.
- ``regress`` task: image → vector regression (a small conv net, MSE), with its own typed config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchmetrics import MeanMetric

from xmodal.images import SampleSet, image_grid
from xmodal.modalities.base import Modality, SampleContext
from xmodal.problems import Problems
from xmodal.registry import MODALITIES, TASKS
from xmodal.tasks.base import XmodalTask
from xmodal.tasks.config import TaskConfig

VECTOR_DIM = 3


class VectorModality(Modality):
    name = "vector"
    extensions = ("vec",)

    def decode(self, found: tuple[str, Any], role: str, spec: Any, ctx: SampleContext) -> dict[str, Any]:
        values = [float(x) for x in found[1].decode("utf-8").split(",")]
        dim = spec.options.get("vector", {}).get("dim", VECTOR_DIM)
        if len(values) != dim:
            raise ValueError(f"sample {ctx.key!r}: .vec has {len(values)} values, not {dim}")
        return {role: torch.tensor(values)}

    def absent(self, role: str, spec: Any) -> dict[str, Any]:
        return {role: torch.zeros(spec.options.get("vector", {}).get("dim", VECTOR_DIM))}


@dataclass
class RegressConfig(TaskConfig):
    task: str = "regress"
    source: str = "image"
    target: str = "vector"
    hidden: int = 16
    lr: float = 1e-2

    def roles(self) -> tuple[str, ...]:
        return (self.source, self.target)

    def problems(self, cfg: Any) -> list[str]:
        p = Problems(cfg)
        p.check(self.lr > 0, "model.lr", "must be > 0")
        return p


class RegressTask(XmodalTask):
    config_class = RegressConfig

    def __init__(self, model: dict[str, Any], vocab: list[str], data: dict[str, Any]):
        super().__init__()
        self.save_hyperparameters()
        self.cfg = RegressConfig.from_node(model)
        channels = data["image_channels"]
        self.net = nn.Sequential(
            nn.Conv2d(channels, self.cfg.hidden, 4, stride=4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(self.cfg.hidden, VECTOR_DIM),
        )
        self.val_mse, self.test_mse = MeanMetric(), MeanMetric()

    def errors(self, batch: dict[str, Any]) -> torch.Tensor:
        predicted = self.net(batch[self.cfg.source])  # [B, D]
        return ((predicted - batch[self.cfg.target]) ** 2).mean(1)  # [B]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        valid = batch["valid"].float()
        loss = (self.errors(batch) * valid).sum() / valid.sum().clamp(min=1)
        self.log_train_scalars({"train/loss": loss}, int(valid.sum()))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.val_mse.update(self.errors(batch)[batch["valid"]])
        self.log("val/mse", self.val_mse)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.test_mse.update(self.errors(batch)[batch["valid"]])
        self.log("test/mse", self.test_mse)

    def validation_samples(self, batch: dict[str, Any]) -> SampleSet:
        predicted = self.net(batch[self.cfg.source].to(self.device)).cpu()
        rows = [[k, f"{p.tolist()}"] for k, p in zip(batch["__key__"], predicted, strict=True)]
        return SampleSet({"inputs": image_grid(batch[self.cfg.source])}, ["key", "predicted"], rows)

    def parallelize(self, mesh: Any) -> None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(self.net, mesh=mesh)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.cfg.lr)


def register() -> None:
    MODALITIES.register("vector", VectorModality)
    TASKS.register("regress", RegressTask)
