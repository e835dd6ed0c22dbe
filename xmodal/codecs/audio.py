"""Audio members (``.wav``; ``.flac`` with the optional ``soundfile``) → log-mel spectrograms.

Written with torch alone (no torchaudio, which is a separate multi-hundred-MB install): a Hann
STFT with a 25 ms window and 10 ms hop, an HTK mel filterbank, and log(mel + 1e-6). Every clip is
cut or padded to a fixed number of frames, with a mask that is True on real frames.
"""

from __future__ import annotations

import io
import math
import wave
from functools import lru_cache

import numpy as np
import torch

SAMPLE_RATE = 16_000
N_FFT = 400  # 25 ms at 16 kHz
HOP = 160  # 10 ms
LOG_FLOOR = 1e-6

# Model units of a log-mel: a fixed affine, not data statistics, so every split, rank, resumed run
# and checkpoint sees the same map and likelihoods stay comparable between runs. The low end is the
# floor log(LOG_FLOOR) ≈ -13.8 (silence, and what padded frames hold) → -1; the high end 8.0 sits
# above the loudest shapes clip (≈ 7.1 on 64 mels: three tones at 0.3 of full scale) → +1. Louder
# data merely lands above 1: Gaussian and Laplace likelihoods are unbounded, only displays clip.
LOG_MEL_LOW = math.log(LOG_FLOOR)
LOG_MEL_HIGH = 8.0


def log_mel_to_unit(mels: torch.Tensor) -> torch.Tensor:
    """Natural-log mel power → model units: LOG_MEL_LOW → -1, LOG_MEL_HIGH → +1 (same shape)."""
    return (mels.float() - LOG_MEL_LOW) * (2.0 / (LOG_MEL_HIGH - LOG_MEL_LOW)) - 1.0


def unit_to_log_mel(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`log_mel_to_unit` (model units → natural-log mel power)."""
    return (x.float() + 1.0) * ((LOG_MEL_HIGH - LOG_MEL_LOW) / 2.0) + LOG_MEL_LOW


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """PCM WAV bytes → mono float32 samples in [-1, 1] and the sample rate."""
    with wave.open(io.BytesIO(data)) as clip:
        rate, channels, width = clip.getframerate(), clip.getnchannels(), clip.getsampwidth()
        frames = clip.readframes(clip.getnframes())
    if width == 2:
        samples = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 1:
        samples = (np.frombuffer(frames, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 4:
        samples = np.frombuffer(frames, dtype="<i4").astype(np.float32) / 2147483648.0
    else:
        raise ValueError(f"unsupported WAV sample width of {width} bytes")
    return samples.reshape(-1, channels).mean(axis=1), rate


def read_flac(data: bytes) -> tuple[np.ndarray, int]:
    try:
        import soundfile
    except ImportError as err:
        raise ValueError("decoding .flac needs the 'soundfile' package (pip install soundfile)") from err
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return samples.mean(axis=1), rate


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


@lru_cache(maxsize=8)
def mel_filterbank(n_mels: int, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> torch.Tensor:
    """Triangular HTK mel filters ``[n_mels, n_fft // 2 + 1]`` from 0 Hz to Nyquist."""
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(0.0, _hz_to_mel(np.array(sample_rate / 2)), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None] - lower) / (centre - lower)
    falling = (upper - bins[None]) / (upper - centre)
    return torch.from_numpy(np.maximum(0.0, np.minimum(rising, falling))).float()


def log_mel(
    samples: np.ndarray, sample_rate: int, n_mels: int, frames: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mono samples → log-mel ``[1, n_mels, frames]`` and a frame mask ``[frames]``.

    Other sample rates are resampled to 16 kHz by linear interpolation: enough for a front end
    whose filters are hundreds of Hz wide.
    """
    wav = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))  # [S]
    if sample_rate != SAMPLE_RATE:
        length = max(1, int(round(wav.numel() * SAMPLE_RATE / sample_rate)))
        wav = torch.nn.functional.interpolate(wav[None, None], size=length, mode="linear")[0, 0]
    if wav.numel() < N_FFT:
        wav = torch.nn.functional.pad(wav, (0, N_FFT - wav.numel()))
    spec = (
        torch.stft(wav, N_FFT, HOP, window=torch.hann_window(N_FFT), center=True, return_complex=True).abs()
        ** 2
    )  # [F, T]
    mel = torch.log(mel_filterbank(n_mels) @ spec + LOG_FLOOR)  # [M, T]
    real = min(mel.shape[1], frames)
    out = torch.full((n_mels, frames), math.log(LOG_FLOOR))  # silence, not zeros
    out[:, :real] = mel[:, :real]
    mask = torch.zeros(frames, dtype=torch.bool)
    mask[:real] = True
    return out[None], mask  # [1, M, T], [T]


def decode_audio(data: bytes, extension: str, n_mels: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Audio member bytes → (log-mel ``[1, M, T]``, mask ``[T]``); raises ValueError when unreadable."""
    try:
        samples, rate = read_flac(data) if extension == "flac" else read_wav(data)
    except (wave.Error, EOFError, RuntimeError) as err:
        raise ValueError(f"unreadable {extension} audio: {err}") from err
    if samples.size == 0:
        raise ValueError("empty audio clip")
    return log_mel(samples, rate, n_mels, frames)
