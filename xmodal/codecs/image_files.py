"""A user's image file → the bytes of a shard member (``xmodal-shards write``), checked first.

The file is opened, verified and fully decoded before it is written, so a truncated or fake image
is a counted skip at write time instead of a decode error in every epoch of training.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from xmodal.problems import SkipRow

SOURCE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FORMATS = ("keep", "png", "jpg")

# Skip reasons (keys of the write report and of ``sizes.json["skipped"]``).
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
IMAGE_TOO_LARGE = "image too large"


def encode_image_file(path: Path, options: Any) -> tuple[str, bytes]:
    """``(extension, bytes)`` of a checked image; raises ``SkipRow`` for a missing/bad/huge one.

    ``options`` has ``max_pixels``, ``image_format`` (one of ``FORMATS``), ``resize`` (None or a
    side) and ``jpeg_quality``. The source bytes are kept when no change is asked for (no
    re-compression loss); otherwise the image is EXIF-rotated, converted to RGB, optionally
    resized/cropped and re-encoded.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SkipRow(MISSING_IMAGE, f"{path} does not exist") from None
    except OSError as error:
        raise SkipRow(MISSING_IMAGE, f"{path}: {error}") from None
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > options.max_pixels:  # header only: nothing decoded yet
                raise SkipRow(IMAGE_TOO_LARGE, f"{path}: {width}x{height} > {options.max_pixels} pixels")
            source_format = probe.format
            probe.verify()
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # verify() does not decode: a truncated file would only fail in training
            ext = {"JPEG": "jpg", "PNG": "png"}.get(source_format or "")
            target = options.image_format if options.image_format != "keep" else (ext or "png")
            if ext == target and options.resize is None:
                return target, data
            return target, _reencode(image, target, options)
    except Image.DecompressionBombError as error:
        raise SkipRow(IMAGE_TOO_LARGE, f"{path}: {error}") from None
    except UnidentifiedImageError:
        raise SkipRow(UNREADABLE_IMAGE, f"{path}: not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise SkipRow(UNREADABLE_IMAGE, f"{path}: {type(error).__name__}: {error}") from None


def _reencode(image: Image.Image, target: str, options: Any) -> bytes:
    rgb = ImageOps.exif_transpose(image).convert("RGB")  # bytes are re-encoded, so bake the rotation in
    if options.resize is not None:  # shorter side to N, then the centre N×N
        rgb = ImageOps.fit(rgb, (options.resize, options.resize), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    if target == "jpg":
        rgb.save(buffer, format="JPEG", quality=options.jpeg_quality)
    else:
        rgb.save(buffer, format="PNG")
    return buffer.getvalue()
