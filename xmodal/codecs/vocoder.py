"""Log-mel (model units) → waveform, with torch alone: the inverse of ``codecs/audio.py``'s analysis.

Three steps, each undoing one of the analysis: the fixed affine and the log (the same
``LOG_MEL_LOW``/``LOG_MEL_HIGH`` and ``LOG_FLOOR``), the mel filterbank (its pseudo-inverse, then
a few projected-gradient steps of non-negative least squares, since a power spectrum is never
negative), and the lost phase (fast Griffin-Lim, Perraudin et al. 2013, with momentum 0.99) on
exactly the STFT of the analysis (``N_FFT``, ``HOP``, Hann window, centred frames, 16 kHz).

Deterministic: the initial phase is drawn from a generator seeded by ``seed``, never the global RNG,
so the same log-mel always gives the same samples.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from xmodal.codecs.audio import HOP, LOG_FLOOR, N_FFT, SAMPLE_RATE, mel_filterbank, unit_to_log_mel
from xmodal.codecs.wav import wav_bytes

GRIFFIN_LIM_ITERS = 32
NNLS_STEPS = 32


def unit_to_mel_power(units: torch.Tensor) -> torch.Tensor:
    """Model-unit log-mels → mel power ≥ 0 (same shape): undoes the affine, the log and its floor."""
    return (unit_to_log_mel(units).exp() - LOG_FLOOR).clamp(min=0.0)


@lru_cache(maxsize=8)
def _mel_inverse(n_mels: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The filterbank ``[M, F]``, its pseudo-inverse ``[F, M]`` and the projected-gradient step 1/L."""
    bank = mel_filterbank(n_mels).double()  # [M, F]
    lipschitz = float(torch.linalg.matrix_norm(bank, ord=2) ** 2)
    return bank.float(), torch.linalg.pinv(bank).float(), 1.0 / lipschitz


def mel_to_linear_power(mel: torch.Tensor, nnls_steps: int = NNLS_STEPS) -> torch.Tensor:
    """Mel power ``[B, M, T]`` → linear power spectrogram ``[B, F, T]`` (F = N_FFT // 2 + 1), ≥ 0.

    The pseudo-inverse clamped at zero starts ``nnls_steps`` projected-gradient steps on
    ``‖bank · S − mel‖²`` over ``S ≥ 0``: the clamp alone leaves the mel of ``S`` off by what it cut.
    """
    bank, inverse, step = _mel_inverse(mel.shape[-2])
    bank, inverse = bank.to(mel.device), inverse.to(mel.device)
    mel = mel.float()
    power = (inverse @ mel).clamp(min=0.0)  # [B, F, T]
    for _ in range(nnls_steps):
        power = (power - step * (bank.T @ (bank @ power - mel))).clamp(min=0.0)
    return power


def griffin_lim(
    magnitude: torch.Tensor, n_iter: int = GRIFFIN_LIM_ITERS, momentum: float = 0.99, seed: int = 0
) -> torch.Tensor:
    """STFT magnitudes ``[B, F, T]`` → waveforms ``[B, (T - 1) · HOP]`` whose STFT has about them.

    Fast Griffin-Lim: each iteration projects onto consistent spectrograms (iSTFT then STFT with the
    analysis' parameters), keeps the phase, and extrapolates by ``momentum`` (0: plain Griffin-Lim).
    """
    window = torch.hann_window(N_FFT, device=magnitude.device)
    length = (magnitude.shape[-1] - 1) * HOP  # centred frames: frame t sits at sample t · HOP
    g = torch.Generator().manual_seed(seed)
    phase = torch.rand(magnitude.shape, generator=g).to(magnitude.device) * (2 * np.pi)  # [B, F, T]
    angles = torch.polar(torch.ones_like(magnitude), phase)  # [B, F, T] complex, unit modulus
    previous = torch.zeros_like(angles)
    for _ in range(n_iter):
        wave = torch.istft(
            magnitude * angles, N_FFT, HOP, window=window, center=True, length=length
        )  # [B, S]
        rebuilt = torch.stft(wave, N_FFT, HOP, window=window, center=True, return_complex=True)  # [B, F, T]
        angles = rebuilt - previous * (momentum / (1.0 + momentum))
        angles = angles / angles.abs().clamp(min=1e-16)
        previous = rebuilt
    return torch.istft(magnitude * angles, N_FFT, HOP, window=window, center=True, length=length)  # [B, S]


@torch.no_grad()
def vocode(units: torch.Tensor, n_iter: int = GRIFFIN_LIM_ITERS, seed: int = 0) -> torch.Tensor:
    """Model-unit log-mels ``[B, 1, M, T]`` (or ``[B, M, T]``) → waveforms ``[B, (T - 1) · HOP]``
    at ``SAMPLE_RATE``, on the analysis' amplitude scale (a shapes tone of 0.3 comes back near 0.3)."""
    mel = unit_to_mel_power(units.reshape(-1, *units.shape[-2:]))  # [B, M, T]
    return griffin_lim(mel_to_linear_power(mel).sqrt(), n_iter=n_iter, seed=seed)


def real_lengths(mask: torch.Tensor) -> list[int]:
    """Samples of each clip's real part: ``(real frames − 1) · HOP`` per row of a frame mask
    ``[B, T]`` (True on real frames), the length :func:`vocode` gives a clip of that many frames."""
    return [(max(int(n), 1) - 1) * HOP for n in mask.reshape(mask.shape[0], -1).sum(1)]


def wave_to_wav(wave: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A waveform ``[S]`` on the [-1, 1] scale → 16-bit PCM mono WAV bytes; scaled down (never up)
    when it would clip, so a loud sample keeps its shape instead of gaining clipping harmonics."""
    wave = wave.detach().float().cpu()
    wave = wave / max(1.0, float(wave.abs().max()) / 0.99) if wave.numel() else wave
    return wav_bytes((wave * 32767).round().to(torch.int16).numpy(), sample_rate)
