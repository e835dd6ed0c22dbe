"""Video: ``.mp4``/``.webm``/... (PyAV) or animated ``.gif``/``.apng`` (Pillow) members → uint8
clips ``[C, T, H, W]``; ``[-1, 1]`` floats only on the task's device, as images.

T is ``data.video_frames`` (evenly spaced over the clip, a short clip holds its last frame) and
H = W = ``data.video_size``; the channels follow ``data.image_channels``. Decoding and its bounds
live in xmodal/codecs/video.py. Displays: a still per clip, its frames side by side
(:meth:`VideoModality.show`, for PNG grids and tables), and the clip itself
(:meth:`VideoModality.animate`, for GIF samples and W&B videos).
"""

from __future__ import annotations

from typing import Any

import torch

from xmodal.codecs.video import CONTAINER_EXTENSIONS, SEQUENCE_EXTENSIONS, decode_video, encode_gif
from xmodal.images import to_pixels
from xmodal.modalities.base import Modality, SampleContext
from xmodal.problems import Problems


class VideoModality(Modality):
    name = "video"
    # Containers first: a sample holding an .mp4 and a preview .gif is read from the .mp4.
    extensions = CONTAINER_EXTENSIONS + SEQUENCE_EXTENSIONS
    source_suffixes = tuple(f".{ext}" for ext in CONTAINER_EXTENSIONS + SEQUENCE_EXTENSIONS)

    def decode(self, found: tuple[str, Any], role: str, spec: Any, ctx: SampleContext) -> dict[str, Any]:
        ext, payload = found
        member = ext if role == self.name else f"{role}.{ext}"
        try:
            clip = decode_video(
                payload, ext, spec.video_frames, spec.video_size, spec.max_pixels, spec.image_channels
            )
        except ValueError as error:
            # Named down to the member: the stream logs this line as the skip's reason.
            shard = ctx.raw.get("__shard__", "<shard>")
            raise ValueError(f"{shard}: sample {ctx.key!r} member {member!r}: {error}") from None
        return {role: clip}  # [C, T, H, W] uint8

    def absent(self, role: str, spec: Any) -> dict[str, Any]:
        shape = (spec.image_channels, spec.video_frames, spec.video_size, spec.video_size)
        return {role: torch.zeros(shape, dtype=torch.uint8)}

    def collate(self, rows: list[dict[str, Any]], role: str, collate: Any) -> dict[str, Any]:
        # uint8 across the worker hand-over (a quarter of float's bytes), as images.
        return {role: torch.stack([r[role] for r in rows])}  # [B, C, T, H, W] uint8

    def to_model_units(self, batch: dict[str, Any], role: str) -> None:
        clip = batch.get(role)
        if isinstance(clip, torch.Tensor) and clip.dtype == torch.uint8:
            batch[role] = clip.float().mul_(1 / 127.5).sub_(1.0)  # [B, C, T, H, W] in [-1, 1]

    def show(self, values: torch.Tensor) -> torch.Tensor:
        # The frames side by side, left to right: a still in which the motion reads.
        clips = values.float()  # [B, C, T, H, W]
        return clips.permute(0, 1, 3, 2, 4).flatten(3)  # [B, C, H, T*W]

    def animate(self, values: torch.Tensor) -> torch.Tensor | None:
        return values.float().transpose(1, 2)  # [B, T, C, H, W]

    def output_files(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> list[tuple[str, bytes]]:
        # Watched, not only seen as a strip of frames: one looping GIF per generated clip.
        clips = self.animate(values)  # [B, T, C, H, W] in [-1, 1]
        return [("gif", encode_gif(to_pixels(clip))) for clip in clips]  # to_pixels: [T, H, W, 3]

    def problems(self, cfg: Any) -> list[str]:
        p = Problems(cfg)
        d = cfg.data
        p.check(d.video_frames >= 1, "data.video_frames", "must be >= 1")
        p.check(d.video_size >= 8, "data.video_size", "must be >= 8")
        return p
