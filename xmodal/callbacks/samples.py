"""Samples at every validation: PNG grids (a Markdown table, WAV clips) in ``samples/``, the same in W&B;
clips as looping GIFs (W&B videos).

What to show is the task's business (``pl_module.validation_samples(batch) -> SampleSet``): a
captioner returns images with generated captions, a GAN samples from a fixed noise bank, a VAE
returns reconstructions and prior samples. The batch is a fixed set of validation samples, so
grids from successive validations are comparable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from PIL import Image

from xmodal.images import markdown_table


class ValidationSamples(L.Callback):
    """Every rank runs the task's sampler (with sharded FSDP2 parameters a forward is a collective);
    rank zero writes the files and logs them."""

    def __init__(self, out_dir: Path, num_samples: int):
        self.out_dir = Path(out_dir)
        self.num_samples = num_samples

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking or self.num_samples <= 0:
            return
        batch = trainer.datamodule.sample_batch(self.num_samples)
        was_training = pl_module.training
        pl_module.eval()
        samples = pl_module.validation_samples(batch)
        pl_module.train(was_training)
        if not trainer.is_global_zero:
            return
        step = getattr(pl_module, "sample_step", trainer.global_step)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, grid in samples.grids.items():
            grid.save(self.out_dir / f"{name}_step{step:07d}.png")
            grid.save(self.out_dir / f"{name}_latest.png")
        if samples.table_rows:
            table = markdown_table(samples.table_columns, samples.table_rows)
            (self.out_dir / f"table_step{step:07d}.md").write_text(table)
        gifs = {name: self.out_dir / f"{name}_step{step:07d}.gif" for name in samples.animations}
        for name, frames in samples.animations.items():
            save_gif(frames, gifs[name])
            save_gif(frames, self.out_dir / f"{name}_latest.gif")
        files = {}
        for group, entries in samples.files.items():
            folder = self.out_dir / f"{group}_step{step:07d}"
            folder.mkdir(exist_ok=True)
            for entry in entries:
                (folder / entry.name).write_bytes(entry.data)
            files[group] = [(str(folder / e.name), e.caption) for e in entries if e.name.endswith(".wav")]
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                for name, grid in samples.grids.items():
                    logger.log_image(f"samples/{name}", [grid], step=trainer.global_step)
                for name, path in gifs.items():
                    # From the GIF file: W&B encodes numpy clips only with moviepy installed.
                    logger.log_video(
                        f"samples/{name}_video", [str(path)], step=trainer.global_step, format=["gif"]
                    )
                if samples.table_rows:
                    logger.log_table("samples/table", samples.table_columns, samples.table_rows)
                for group, clips in files.items():
                    if clips:
                        paths, captions = zip(*clips, strict=True)
                        logger.log_audio(
                            f"samples/{group}", list(paths), step=trainer.global_step, caption=list(captions)
                        )


def save_gif(frames: list[Image.Image], path: Path, fps: int = 4) -> None:
    """An endlessly looping GIF of ``frames`` (Pillow's writer: no extra dependency)."""
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
