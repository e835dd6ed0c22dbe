"""Caption samples at every validation: a PNG grid in ``samples/`` and an image + table in W&B."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def caption_grid(images: torch.Tensor, captions: list[str], columns: int = 4, scale: int = 2) -> Image.Image:
    """Images ``[B, 3, H, W]`` in [-1, 1] in a grid, each with its caption written under it."""
    font = ImageFont.load_default()
    batch, _, height, width = images.shape
    cell_w, text_h = width * scale, 58
    rows = (batch + columns - 1) // columns
    grid = Image.new("RGB", (columns * (cell_w + 8), rows * (height * scale + text_h + 8)), "white")
    draw = ImageDraw.Draw(grid)
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    for i in range(batch):
        x = (i % columns) * (cell_w + 8) + 4
        y = (i // columns) * (height * scale + text_h + 8) + 4
        tile = Image.fromarray(np.ascontiguousarray(pixels[i])).resize(
            (cell_w, height * scale), Image.NEAREST
        )
        grid.paste(tile, (x, y))
        # ~6 px per character in the default bitmap font
        lines = textwrap.wrap(captions[i], width=max(cell_w // 6, 8))[:5]
        draw.multiline_text((x, y + height * scale + 2), "\n".join(lines), fill="black", font=font, spacing=1)
    return grid


class CaptionSamples(L.Callback):
    """Captions a fixed set of validation samples after every validation; rank zero writes them.

    Every rank runs the captioner: with sharded (FSDP2) parameters a forward is a collective.
    """

    def __init__(self, out_dir: Path, num_samples: int):
        self.out_dir = Path(out_dir)
        self.num_samples = num_samples

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking or self.num_samples <= 0:
            return
        batch = trainer.datamodule.sample_batch(self.num_samples)
        source = batch[pl_module.source].to(pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        captions = pl_module.caption(source)
        pl_module.train(was_training)
        if not trainer.is_global_zero:
            return
        grid = caption_grid(batch[pl_module.source], captions)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"val_step{trainer.global_step:07d}.png"
        grid.save(path)
        grid.save(self.out_dir / "val_latest.png")
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image("samples/val", [grid], step=trainer.global_step)
                rows = [
                    [k, refs[0], hyp]
                    for k, refs, hyp in zip(batch["__key__"], batch["captions"], captions, strict=True)
                ]
                logger.log_table("samples/val_captions", ["key", "reference", "generated"], rows)
