"""The ``sensor`` modality: ``key.npy`` members holding a float array ``[channels, length]``.

Options (``data.options.sensor``): ``channels`` and ``length``; a series of another shape is a
counted skip naming the sample. Batches hold ``sensor`` float ``[B, C, L]``.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from xmodal.modalities.base import Modality, SampleContext
from xmodal.problems import Problems


def _options(spec: Any) -> tuple[int, int]:
    options = spec.options.get("sensor", {})
    return int(options.get("channels", 1)), int(options.get("length", 64))


class SensorModality(Modality):
    name = "sensor"
    extensions = ("npy",)

    def decode(self, found: tuple[str, Any], role: str, spec: Any, ctx: SampleContext) -> dict[str, Any]:
        # allow_pickle=False: an object array in a shard is refused instead of unpickled.
        array = np.load(io.BytesIO(found[1]), allow_pickle=False)
        channels, length = _options(spec)
        if array.ndim == 1:
            array = array[None]
        if array.shape != (channels, length) or not np.issubdtype(array.dtype, np.number):
            raise ValueError(
                f"sample {ctx.key!r}: {role} has shape {array.shape} ({array.dtype}), "
                f"data.options.sensor expects ({channels}, {length}) numbers"
            )
        return {role: torch.from_numpy(array.astype(np.float32))}  # [C, L]

    def absent(self, role: str, spec: Any) -> dict[str, Any]:
        return {role: torch.zeros(_options(spec))}

    def show(self, values: torch.Tensor) -> torch.Tensor:
        """Series ``[B, C, L]`` → line plots ``[B, 1, 32, L]`` in [-1, 1] (white trace on black)."""
        b, _, length = values.shape
        height = 32
        lo = values.amin(dim=(1, 2), keepdim=True)
        hi = values.amax(dim=(1, 2), keepdim=True)
        rows = ((values - lo) / (hi - lo).clamp(min=1e-6) * (height - 1)).round().long()  # [B, C, L]
        images = torch.full((b, 1, height, length), -1.0)
        for c in range(values.shape[1]):
            images[torch.arange(b)[:, None], 0, height - 1 - rows[:, c], torch.arange(length)[None]] = 1.0
        return images

    def problems(self, cfg: Any) -> list[str]:
        p = Problems(cfg)
        options = cfg.data.options.get("sensor", {})
        p.check(int(options.get("length", 64)) >= 4, "data.options.sensor.length", "must be >= 4")
        p.check(int(options.get("channels", 1)) >= 1, "data.options.sensor.channels", "must be >= 1")
        return p
