"""Video members → uint8 clips ``[C, T, H, W]`` of a fixed T, and frames → ``.mp4``/``.webm`` bytes.

Two kinds of member are read:

- **containers** (``.mp4``, ``.webm``, ``.mkv``, ``.mov``, ``.avi``) through PyAV (its wheels
  bundle FFmpeg), imported on first use so nothing else of xmodal needs it;
- **frame sequences**: an animated ``.gif`` or ``.apng`` (animated PNG, lossless) through Pillow,
  one file holding every frame; no pickled or NumPy members are read.

Bounds: the member's bytes are bounded by the shard reader (``data.max_member_bytes``) before they
reach a decoder; here each frame's pixel count is checked against ``data.max_image_pixels`` from
the stream header before a pixel is decoded, and at most :data:`MAX_DECODED_FRAMES` frames of a
member are decoded (frames past it are never read). Any failure is a ``ValueError`` whose message
says what is wrong; the modality prefixes the shard, key and member (a counted skip).

Fixed T (:func:`frame_indices`): T frames evenly spaced over the clip, each the middle frame of its
1/T of the clip (T=1: the middle frame); a clip shorter than T repeats its last frame (a held
frame, not a black one, so a short clip still looks like itself). Every frame is resized (a plain
stretch, as images' ``resize``) to ``size``×``size``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageSequence

CONTAINER_EXTENSIONS: tuple[str, ...] = ("mp4", "webm", "mkv", "mov", "avi")
SEQUENCE_EXTENSIONS: tuple[str, ...] = ("gif", "apng")
MAX_DECODED_FRAMES = 4096
"""Frames decoded from one member at the most; a longer clip is sampled from its first ones."""


def frame_indices(available: int, wanted: int) -> list[int]:
    """``wanted`` frame indices into a clip of ``available`` frames: the middle of each of
    ``wanted`` equal parts, or every frame then the last one repeated when the clip is short."""
    if available < 1 or wanted < 1:
        raise ValueError(f"need at least one frame (clip has {available}, {wanted} wanted)")
    if available <= wanted:
        return list(range(available)) + [available - 1] * (wanted - available)
    return [int((i + 0.5) * available / wanted) for i in range(wanted)]


def _check_frame_size(width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"video frames of {width}×{height} pixels")
    if width * height > max_pixels:
        raise ValueError(f"video frames of {width}×{height} pixels exceed data.max_image_pixels={max_pixels}")


def _container_frames(data: bytes, size: int, max_pixels: int) -> Iterator[np.ndarray]:
    """``[size, size, 3]`` uint8 frames of the first video stream of a container, in order."""
    try:
        import av
    except ImportError as error:  # a dependency, but say how to get it if an install lacks it
        raise ValueError("video members need PyAV: pip install av") from error
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            _check_frame_size(stream.codec_context.width, stream.codec_context.height, max_pixels)
            for frame in container.decode(stream):
                # swscale resizes and converts in one pass: no full-size RGB copy is made.
                yield frame.reformat(width=size, height=size, format="rgb24").to_ndarray()
    except av.FFmpegError as error:
        raise ValueError(f"cannot decode video ({error})") from None


def _sequence_frames(data: bytes, size: int, max_pixels: int) -> Iterator[np.ndarray]:
    """``[size, size, 3]`` uint8 frames of an animated GIF / APNG (a still image is one frame)."""
    try:
        image = Image.open(io.BytesIO(data))
        _check_frame_size(*image.size, max_pixels)
        for frame in ImageSequence.Iterator(image):
            yield np.asarray(frame.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot decode frames ({error})") from None


def decode_video(
    data: bytes, ext: str, frames: int, size: int, max_pixels: int, channels: int = 3
) -> torch.Tensor:
    """Member bytes (by extension) → uint8 ``[C, T, H, W]`` with ``T = frames``, ``H = W = size``.

    Raises ValueError for an unknown extension, an unreadable or empty clip, or frames larger than
    ``max_pixels``."""
    if ext in CONTAINER_EXTENSIONS:
        source = _container_frames(data, size, max_pixels)
    elif ext in SEQUENCE_EXTENSIONS:
        source = _sequence_frames(data, size, max_pixels)
    else:
        raise ValueError(f"not a video member extension: {ext!r}")
    decoded: list[np.ndarray] = []
    for frame in source:
        decoded.append(frame)  # [H, W, 3]
        if len(decoded) >= MAX_DECODED_FRAMES:
            break
    if not decoded:
        raise ValueError("the clip holds no frames")
    clip = np.stack([decoded[i] for i in frame_indices(len(decoded), frames)])  # [T, H, W, 3]
    pixels = torch.from_numpy(clip).permute(3, 0, 1, 2)  # [3, T, H, W]
    if channels == 1:  # ITU-R 601 luma, as PIL's convert("L")
        weights = torch.tensor([299, 587, 114], dtype=torch.int32)[:, None, None, None]
        pixels = ((pixels.int() * weights).sum(0, keepdim=True) // 1000).to(torch.uint8)  # [1, T, H, W]
    return pixels.contiguous()


# Lossless or near-lossless settings per codec: the built-in data and the tests write with these.
ENCODER_OPTIONS: dict[str, tuple[str, dict[str, str]]] = {
    # H.264 at qp 0 is lossless; 4:4:4 keeps the colour of small shapes' edges (x264 "High 4:4:4").
    "libx264": ("yuv444p", {"qp": "0", "preset": "ultrafast", "tune": "zerolatency"}),
    "mpeg4": ("yuv420p", {"qscale": "1"}),
    "libvpx": ("yuv420p", {"crf": "4", "b": "4M"}),  # VP8 (WebM)
    "libvpx-vp9": ("yuv444p", {"lossless": "1"}),  # VP9 (WebM)
}


def encode_video(frames: Sequence[np.ndarray] | np.ndarray, fps: int = 8, codec: str = "libx264") -> bytes:
    """RGB uint8 frames ``[T, H, W, 3]`` (even H, W) → the bytes of an ``.mp4`` (libx264, mpeg4) or
    ``.webm`` (libvpx, libvpx-vp9) file, encoded by PyAV as a user's tool would write it."""
    import av

    pix_fmt, options = ENCODER_OPTIONS[codec]
    height, width = frames[0].shape[:2]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="webm" if codec.startswith("libvpx") else "mp4") as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        # One thread: an encoder per 8-frame clip; starting a thread pool each time costs more.
        stream.codec_context.thread_count = 1
        for frame in frames:
            container.mux(
                stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24"))
            )
        container.mux(stream.encode())
    return buffer.getvalue()


def encode_gif(frames: Sequence[np.ndarray] | np.ndarray, fps: int = 4) -> bytes:
    """RGB uint8 frames ``[T, H, W, 3]`` → the bytes of an endlessly looping GIF (Pillow: any
    viewer or browser plays it, no codec needed), read back by :func:`decode_video`."""
    images = [Image.fromarray(np.ascontiguousarray(frame)) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(
        buffer, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0
    )
    return buffer.getvalue()
