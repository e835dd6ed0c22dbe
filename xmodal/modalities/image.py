"""Images: PNG/JPEG/WebP/BMP/GIF/TIFF members → uint8 ``[C, H, W]``; ``[-1, 1]`` floats only on the task's device."""

from __future__ import annotations

import random
import zlib
from pathlib import Path
from typing import Any

import torch

from xmodal.codecs.image_files import SOURCE_SUFFIXES, encode_image_file
from xmodal.codecs.pixels import decode_image
from xmodal.modalities.base import Modality, SampleContext
from xmodal.problems import Problems


def sample_hash(purpose: str, seed: int, epoch: int, key: str) -> int:
    """A per-sample integer that is a pure function of (purpose, seed, epoch, key), in any process."""
    return zlib.crc32(f"{purpose}:{seed}:{epoch}:{key}".encode())


class ImageModality(Modality):
    name = "image"
    # Preference order when a sample holds several: lossless first.
    extensions = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
    source_suffixes = SOURCE_SUFFIXES

    def decode(self, found: tuple[str, Any], role: str, spec: Any, ctx: SampleContext) -> dict[str, Any]:
        # A training crop moves with the epoch but is the same on a resumed run (seeded like captions).
        # Seeded with an integer: seeding ``random.Random`` with a string runs SHA-512 (~10 µs).
        crop_rng = (
            random.Random(sample_hash("crop", ctx.seed, ctx.epoch, ctx.key))
            if ctx.train and spec.image_fit == "random_crop"
            else None
        )
        pixels = decode_image(
            found[1], spec.image_size, spec.max_pixels, spec.image_channels, spec.image_fit, crop_rng
        )
        return {role: pixels}  # [C, H, W] uint8

    def absent(self, role: str, spec: Any) -> dict[str, Any]:
        return {role: torch.zeros(spec.image_channels, spec.image_size, spec.image_size, dtype=torch.uint8)}

    def collate(self, rows: list[dict[str, Any]], role: str, collate: Any) -> dict[str, Any]:
        # uint8 until it is on the device (to_model_units): a quarter of the bytes to hand from
        # worker to main process, and no float pass in the worker (it was half the collate time).
        return {role: torch.stack([r[role] for r in rows])}  # [B, C, H, W] uint8

    def to_model_units(self, batch: dict[str, Any], role: str) -> None:
        image = batch.get(role)
        if isinstance(image, torch.Tensor) and image.dtype == torch.uint8:
            batch[role] = image.float().mul_(1 / 127.5).sub_(1.0)  # [B, C, H, W] in [-1, 1]

    def show(self, values: torch.Tensor) -> torch.Tensor:
        return values.float()

    def write_member(self, path: Path, options: Any) -> tuple[str, bytes]:
        # Checked and, when asked, re-encoded to PNG/JPEG: the only formats the loader decodes.
        return encode_image_file(path, options)

    def problems(self, cfg: Any) -> list[str]:
        p = Problems(cfg)
        d = cfg.data
        p.check(d.image_size >= 8, "data.image_size", "must be >= 8")
        p.check(d.image_channels in (1, 3), "data.image_channels", "must be 1 (grey) or 3 (RGB)")
        p.one_of("data.image_fit", ("resize", "center_crop", "random_crop"))
        return p
