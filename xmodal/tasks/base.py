"""What every xmodal task shares, whatever it generates."""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from xmodal.data.datamodule import images_to_float

# The hooks live on the task, so they also run for dataloaders handed to trainer.test directly (the
# holdout split, xmodal-eval); Lightning warns when a datamodule is passed too, then uses these.
warnings.filterwarnings(
    "ignore",
    message="You have overridden `(on_after_batch_transfer|transfer_batch_to_device)` in `LightningModule`",
)

# Batch entries that are per-row Python metadata (see BatchCollate): never tensors, never moved.
METADATA_KEYS = frozenset({"captions", "__key__"})


class XmodalTask(L.LightningModule):
    """A LightningModule that receives loader batches with uint8 images and sees float ones.

    Loader workers collate images as uint8 (a quarter of the bytes between processes); the float
    conversion runs here, after the batch reached the task's device, for fit, validate and test
    alike, whichever dataloader Lightning was handed.
    """

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if not isinstance(batch, dict):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        # Lightning's default walks every element of the caption and key lists: several hundred
        # Python calls a batch (~0.5 ms on CPU) to move nothing.
        non_blocking = device.type == "cuda"
        return {
            key: value.to(device, non_blocking=non_blocking)
            if isinstance(value, torch.Tensor)
            else value
            if key in METADATA_KEYS
            else move_data_to_device(value, device)
            for key, value in batch.items()
        }

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return images_to_float(batch) if isinstance(batch, dict) else batch

    def log_train_scalars(
        self, scalars: dict[str, Any], batch_size: int, prog_bar: tuple[str, ...] = ()
    ) -> None:
        """Training-step scalars, handed to ``self.log`` on the steps whose values reach the logger.

        Each ``self.log`` call walks the logged metric's whole state (~0.3 ms on CPU, Lightning
        2.6): a VAE step logging five scalars spent 1.5 % of its 100 ms there. Step values logged
        between two logger writes are overwritten unread, so those steps log only the
        progress-bar scalars, which the bar shows every step (when there is a bar).
        """
        writes = self._logger_writes_this_step()
        shown = self._trainer is None or self._trainer.progress_bar_callback is not None
        for name, value in scalars.items():
            if writes or (shown and name in prog_bar):
                self.log(name, value, prog_bar=name in prog_bar, batch_size=batch_size)

    def _logger_writes_this_step(self) -> bool:
        trainer = self._trainer
        connector = getattr(trainer, "_logger_connector", None)  # private: if it moves, log every step
        if trainer is None or connector is None:
            return True
        return bool(connector.should_update_logs or trainer.fast_dev_run)
