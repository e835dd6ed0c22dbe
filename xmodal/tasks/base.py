"""What every xmodal task shares, whatever it generates."""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L

from xmodal.data.datamodule import images_to_float

# The hook lives on the task, so it also runs for dataloaders handed to trainer.test directly (the
# holdout split, xmodal-eval); Lightning warns when a datamodule is passed too, then uses this one.
warnings.filterwarnings(
    "ignore", message="You have overridden `on_after_batch_transfer` in `LightningModule`"
)


class XmodalTask(L.LightningModule):
    """A LightningModule that receives loader batches with uint8 images and sees float ones.

    Loader workers collate images as uint8 (a quarter of the bytes between processes); the float
    conversion runs here, after the batch reached the task's device, for fit, validate and test
    alike, whichever dataloader Lightning was handed.
    """

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return images_to_float(batch) if isinstance(batch, dict) else batch
