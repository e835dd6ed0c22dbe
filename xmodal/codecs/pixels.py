"""Image bytes → uint8 ``[C, H, W]`` tensors: header check, decode, resize/crop.

PNG and JPEG go straight to libspng (``pyspng``) and libjpeg-turbo (``simplejpeg``) when the file
already holds the colour type asked for. PIL decodes with the same C libraries, but on the small
images this framework streams its Python-level header parsing costs more than the decode itself:
a 64×64 JPEG takes ~85 µs through ``Image.open(...).convert("RGB")`` and ~15 µs through
libjpeg-turbo; a 28×28 MNIST PNG ~32 µs against ~6 µs (benchmarks/loader_throughput.py). The
pixels are the same (tests/test_decode.py compares them). Everything else — other colour types,
16-bit PNGs, CMYK JPEGs, WebP, BMP, GIF (first frame), TIFF, files the fast decoders reject —
takes the PIL path, which also gives the error message for unreadable bytes.

Large sources (users' photos are 256–1024 px; experiments see 32–256): a JPEG at least twice the
size it is fitted to is decoded at 1/2, 1/4 or 1/8 scale inside libjpeg (DCT scaling; PIL's
``draft`` on the PIL path), never below the fitted size, then resized as any image. 16-bit
greyscale is scaled to 8 bits (its high byte, ≈ v / 257), not clipped to white as PIL's
``convert("L")`` does. Photos carrying an EXIF orientation (phone cameras) are turned upright,
as viewers show them: shards written from a phone's JPEGs by webdataset's own writer keep the tag.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pyspng
import simplejpeg
import torch
from PIL import Image, ImageOps

MAX_IMAGE_PIXELS = 50_000_000

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_START = b"\xff\xd8"
# PNG colour types (IHDR byte 25) that are already the target layout, at 8 bits per channel.
_PNG_COLOUR = {3: 2, 1: 0}  # RGB, greyscale
# JPEG colour spaces libjpeg-turbo turns into the target exactly as PIL does: YCbCr → RGB is the
# same library call, and greyscale → RGB repeats the channel in both.
_JPEG_SPACES = {3: ("YCbCr", "Gray"), 1: ("Gray",)}


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Refuse an image by its header size, before a pixel is decoded (decompression bombs)."""
    if width * height > max_pixels:
        raise ValueError(f"image of {width}×{height} pixels exceeds data.max_image_pixels={max_pixels}")


def jpeg_orientation(data: bytes) -> int:
    """The EXIF orientation tag (1–8) of a JPEG, 1 when it has none: phone cameras store pixels as
    the sensor saw them and this tag says how to turn them upright. Read from the APP1 segment's
    first IFD without decoding anything (the fast path's check costs a few µs)."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in (0xD9, 0xDA):  # end of image, start of scan: metadata segments come before
            break
        body = data[pos + 4 : pos + 2 + length]
        if marker == 0xE1 and body.startswith(b"Exif\x00\x00"):
            tiff = body[6:]
            order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
            if order is None or len(tiff) < 8:
                return 1
            ifd = int.from_bytes(tiff[4:8], order)
            count = int.from_bytes(tiff[ifd : ifd + 2], order) if ifd + 2 <= len(tiff) else 0
            for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
                if int.from_bytes(tiff[entry : entry + 2], order) == 0x0112:
                    value = int.from_bytes(tiff[entry + 8 : entry + 10], order)
                    return value if 1 <= value <= 8 else 1
            return 1
        pos += 2 + length
    return 1


def _jpeg_scale(width: int, height: int, need: int) -> int:
    """The largest of 8, 4, 2, 1 that keeps both sides >= ``need`` (libjpeg's fast scales: other
    n/8 factors decode slower than the full image)."""
    for factor in (8, 4, 2):
        if need > 0 and width // factor >= need and height // factor >= need:
            return factor
    return 1


def _decode_fast(data: bytes, channels: int, max_pixels: int, need: int = 0) -> np.ndarray | None:
    """``[H, W, C]`` uint8 through libspng / libjpeg-turbo, or None to leave the image to PIL.

    ``need``: the smallest side the caller fits the image to (0: full size); a JPEG may then come
    back smaller than stored, by a power of two, but with both sides >= ``need``."""
    if data.startswith(_PNG_SIGNATURE):
        if data[12:16] != b"IHDR":  # the PNG standard puts IHDR first; anything else goes to PIL
            return None
        check_pixels(int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"), max_pixels)
        if data[24] != 8 or data[25] != _PNG_COLOUR[channels]:
            return None
        try:
            array = pyspng.load(data)  # [H, W, 3] or [H, W]
        except RuntimeError:
            return None
    elif data.startswith(_JPEG_START):
        try:
            height, width, space, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            return None
        check_pixels(width, height, max_pixels)
        if space not in _JPEG_SPACES[channels] or jpeg_orientation(data) != 1:
            return None  # PIL turns a rotated or mirrored photo upright (decode_pil)
        try:
            # strict: a truncated or corrupt file raises (then PIL names the fault) instead of
            # coming back grey-filled.
            factor = _jpeg_scale(width, height, need)
            scaled = {"min_width": math.ceil(width / factor), "min_height": math.ceil(height / factor)}
            array = simplejpeg.decode_jpeg(
                data,
                colorspace="RGB" if channels == 3 else "GRAY",
                strict=True,
                **(scaled if factor > 1 else {}),
            )
        except ValueError:
            return None
    else:
        return None
    array = array if array.ndim == 3 else array[:, :, None]  # [H, W, C]
    return array if array.shape[2] == channels else None  # e.g. a transparency chunk added alpha


_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def decode_pil(data: bytes, channels: int, max_pixels: int, need: int = 0) -> Image.Image:
    """Any format PIL reads (the first frame of an animation), converted to RGB or L; the size is
    checked before decoding. ``need`` as in :func:`_decode_fast` (JPEG draft mode)."""
    img = Image.open(io.BytesIO(data))
    check_pixels(*img.size, max_pixels)
    if need and img.format == "JPEG":
        factor = _jpeg_scale(*img.size, need)
        if factor > 1:
            img.draft(img.mode, (math.ceil(img.size[0] / factor), math.ceil(img.size[1] / factor)))
    if img.mode in _SIXTEEN_BIT:
        # 16-bit grey (PNG, TIFF): PIL's convert("L") clips at 255, so anything above 255/65535
        # would read as white. Keep the high byte instead (v >> 8 ≈ v / 257), as PIL itself
        # reduces 16-bit RGB, so grey and colour 16-bit images agree.
        wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        img = Image.fromarray((wide >> 8).astype(np.uint8), "L")
    if img.format in ("JPEG", "MPO", "TIFF", "WEBP") and img.getexif().get(0x0112, 1) != 1:
        img = ImageOps.exif_transpose(img)  # upright, as the camera meant it (PNGs rarely carry it)
    return img.convert("RGB" if channels == 3 else "L")


def _fit(img: Image.Image, size: int, fit: str, rng: random.Random | None) -> Image.Image:
    """Bring an image to ``size``×``size``: stretched, or scaled by its short side and cut."""
    if fit == "resize":
        return img if img.size == (size, size) else img.resize((size, size), Image.BICUBIC)
    short = size if fit == "center_crop" else -(-size * 9 // 8)
    width, height = img.size
    scale = short / min(width, height)
    scaled = (max(short, round(width * scale)), max(short, round(height * scale)))
    if scaled != img.size:
        img = img.resize(scaled, Image.BICUBIC)
    spare_x, spare_y = scaled[0] - size, scaled[1] - size
    if rng is None:  # centre
        left, top = spare_x // 2, spare_y // 2
    else:
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    return img.crop((left, top, left + size, top + size))


def decode_image(
    data: bytes,
    image_size: int,
    max_pixels: int = MAX_IMAGE_PIXELS,
    channels: int = 3,
    fit: str = "resize",
    rng: random.Random | None = None,
) -> torch.Tensor:
    """PNG/JPEG/... bytes → uint8 ``[C, H, W]`` (kept uint8 in memory: 4× smaller than float).

    Too large (by the header) or unreadable images raise (a counted skip in the stream). ``rng``
    places a ``random_crop`` (None: the centre).
    """
    need = -(-image_size * 9 // 8) if fit == "random_crop" else image_size  # _fit's short side
    array = _decode_fast(data, channels, max_pixels, need)  # [H, W, C]
    if array is None or array.shape[:2] != (image_size, image_size) or fit == "random_crop":
        img = (
            decode_pil(data, channels, max_pixels, need)
            if array is None
            else Image.fromarray(array[:, :, 0] if channels == 1 else array)
        )
        array = np.array(_fit(img, image_size, fit, rng), dtype=np.uint8)  # [H, W, 3] or [H, W]
        if array.ndim == 2:
            array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1)  # [C, H, W]
