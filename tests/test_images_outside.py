"""Images as users bring them: 16-bit PNG and TIFF, WebP, BMP, GIF, TIFF, CMYK/palette/RGBA, and
photo-sized sources (256 px) fitted to a small experiment."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from xmodal.codecs.pixels import decode_image


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG written byte by byte (PIL writes 16-bit greyscale only; RGB needs this)."""
    height, width = pixels.shape[:2]
    colour = 0 if pixels.ndim == 2 else {2: 4, 3: 2, 4: 6}[pixels.shape[2]]
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def saved(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_16_bit_greyscale_is_scaled_not_clipped_to_white():
    grey = png16(np.full((8, 8), 22359, np.uint16))  # 22359 / 257 = 87.0
    assert decode_image(grey, 8, channels=1).unique().tolist() == [87]
    assert decode_image(grey, 8, channels=3).unique().tolist() == [87]
    ramp = png16(np.array([[0, 257, 32768, 65535]], np.uint16).repeat(4, 0))
    assert decode_image(ramp, 4, channels=1)[0, 0].tolist() == [0, 1, 128, 255]
    rgb = png16(np.full((8, 8, 3), [22359, 1000, 65535], np.uint16))
    assert decode_image(rgb, 8)[:, 0, 0].tolist() == [87, 3, 255]  # as PIL reduces 16-bit RGB: v >> 8
    tiff = saved(Image.fromarray(np.full((8, 8), 22359, np.uint16)), "TIFF")
    assert decode_image(tiff, 8, channels=1).unique().tolist() == [87]


@pytest.mark.parametrize(
    ("fmt", "mode", "options"),
    [
        ("WEBP", "RGB", {"lossless": True}),
        ("BMP", "RGB", {}),
        ("TIFF", "RGB", {}),
        ("GIF", "P", {}),
        ("PNG", "P", {}),
        ("PNG", "RGBA", {}),
        ("JPEG", "CMYK", {"quality": 100}),
    ],
)
def test_every_common_format_decodes_to_its_colours(fmt, mode, options):
    image = Image.new("RGB", (16, 16), (200, 40, 90))
    image = image.convert(mode) if mode != "P" else image.quantize(8)
    pixels = decode_image(saved(image, fmt, **options), 16)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.uint8
    assert np.abs(pixels[:, 8, 8].numpy().astype(int) - [200, 40, 90]).max() <= 6, (fmt, mode)


def test_a_gif_decodes_its_first_frame():
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    assert decode_image(buffer.getvalue(), 16)[:, 0, 0].tolist() == [255, 0, 0]


def photo(size: int = 256) -> Image.Image:
    """Smooth content with detail at every scale (gradients plus a few discs), like a photo."""
    y, x = np.mgrid[0:size, 0:size] / size
    red = 128 + 100 * np.sin(6 * x)
    green = 128 + 100 * np.cos(5 * y)
    blue = 255 * ((x - 0.5) ** 2 + (y - 0.4) ** 2 < 0.05)
    return Image.fromarray(np.stack([red, green, blue], -1).astype(np.uint8))


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("fit", ["resize", "center_crop"])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_a_256_px_source_fits_a_small_experiment_like_a_full_size_resize(size, fit, fmt):
    source = photo(256).resize((256, 192)) if fit == "center_crop" else photo(256)
    data = saved(source, fmt, quality=95) if fmt != "PNG" else saved(source, fmt)
    fitted = decode_image(data, size, fit=fit)
    assert fitted.shape == (3, size, size)
    # Reference: the full-size decode, then PIL's antialiased resize (JPEGs take DCT scaling).
    full = Image.open(io.BytesIO(data)).convert("RGB")
    if fit == "center_crop":
        scale = size / 192
        full = full.resize((round(256 * scale), size), Image.BICUBIC)
        left = (full.size[0] - size) // 2
        full = full.crop((left, 0, left + size, size))
    else:
        full = full.resize((size, size), Image.BICUBIC)
    reference = torch.from_numpy(np.asarray(full).copy()).permute(2, 0, 1)
    assert (fitted.float() - reference.float()).abs().mean() < 3.0


@pytest.mark.slow
def test_a_256_px_experiment_composes_and_trains_two_steps(tmp_path):
    from tests.conftest import TINY
    from tests.test_outside_data import write_shardwriter_dir
    from xmodal.config import compose_config
    from xmodal.train import train

    shards = write_shardwriter_dir(tmp_path / "big", n=24, per_shard=8, size=256)
    cfg = compose_config(
        [
            *TINY,
            f"data.shards={shards}",
            "data.image_size=256",
            "data.batch_size=2",
            "model.encoder_channels=[16,32]",
            "data.val_fraction=0.2",
            "data.test_fraction=0",
            "test_after_fit=false",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1",
            "trainer.num_sanity_val_steps=0",
            "model.max_decode_len=8",
            "logger=none",
            "callbacks.num_samples=2",
            f"paths.output_dir={tmp_path / 'out'}",
            f"paths.data_dir={tmp_path / 'data'}",
        ]
    )
    metrics = train(cfg)
    assert "val/loss" in metrics


def phone_jpeg(orientation: int) -> bytes:
    """A 40×20 photo stored as the sensor saw it (left half red, right half blue), with the EXIF
    orientation tag a phone camera writes, encoded by PIL as a camera app would (libjpeg)."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


def test_a_phone_photo_with_an_exif_orientation_is_turned_upright():
    from xmodal.codecs.pixels import jpeg_orientation

    upright = decode_image(phone_jpeg(6), 32)  # 6: turn 90° clockwise to view
    assert jpeg_orientation(phone_jpeg(6)) == 6 and jpeg_orientation(phone_jpeg(1)) == 1
    # Turned clockwise, the sensor's left (red) half is on top, its right (blue) half below.
    assert upright[:, 4, 16].tolist()[0] > 200 and upright[:, 4, 16].tolist()[2] < 60
    assert upright[:, 28, 16].tolist()[2] > 200 and upright[:, 28, 16].tolist()[0] < 60
    plain = decode_image(phone_jpeg(1), 32)  # no turn: red left, blue right (the fast path)
    assert plain[0, 16, 4] > 200 and plain[2, 16, 28] > 200
    # A big-endian ("MM", as many cameras write) APP1 segment is read the same way.
    tiff = (
        b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, 8, 0)
    )
    segment = b"Exif\x00\x00" + tiff + struct.pack(">I", 0)
    jpeg = phone_jpeg(1)
    hand_made = jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + jpeg[2:]
    assert jpeg_orientation(hand_made) == 8
