"""WAV file bytes from PCM samples: numpy and the standard library only, so that the shapes
generator (and ``xmodal-shards --help``, which imports it) does not import torch."""

from __future__ import annotations

import io
import wave

import numpy as np


def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM mono WAV file bytes of an int16 ``[N]`` clip."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(audio.astype("<i2").tobytes())
    return buffer.getvalue()
