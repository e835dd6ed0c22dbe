"""Audio: WAV/FLAC members → log-mel ``[1, M, T]`` (model units from collate on) plus a real-frame mask ``[T]``."""

from __future__ import annotations

import math
from typing import Any

import torch

from xmodal.codecs.audio import LOG_FLOOR, decode_audio, log_mel_to_unit
from xmodal.codecs.vocoder import real_lengths, vocode, wave_to_wav
from xmodal.images import spectrogram_images
from xmodal.modalities.base import Modality, SampleContext
from xmodal.problems import Problems


class AudioModality(Modality):
    name = "audio"
    extensions = ("wav", "flac")
    source_suffixes = (".wav", ".flac")  # copied as they are: decoding is the loader's job

    def decode(self, found: tuple[str, Any], role: str, spec: Any, ctx: SampleContext) -> dict[str, Any]:
        mel, mask = decode_audio(found[1], found[0], spec.audio_mels, spec.audio_frames)
        return {role: mel, f"{role}_mask": mask}  # [1, M, T], [T] True on real frames

    def absent(self, role: str, spec: Any) -> dict[str, Any]:
        return {
            role: torch.full((1, spec.audio_mels, spec.audio_frames), math.log(LOG_FLOOR)),
            f"{role}_mask": torch.zeros(spec.audio_frames, dtype=torch.bool),
        }

    def collate(self, rows: list[dict[str, Any]], role: str, collate: Any) -> dict[str, Any]:
        # The one place log-mels become model units. Here, not after the device transfer as images
        # do: they are float already (nothing to save on the hand-over), and a batch is collated
        # once, so the affine can never be applied twice.
        return {
            role: log_mel_to_unit(torch.stack([r[role] for r in rows])),  # [B, 1, M, T] in about [-1, 1]
            f"{role}_mask": torch.stack([r[f"{role}_mask"] for r in rows]),  # [B, T]
        }

    def show(self, values: torch.Tensor) -> torch.Tensor:
        # A spectrogram shows as a grey image (mel bands upwards), scaled to [-1, 1] per clip.
        return spectrogram_images(values)

    def output_files(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> list[tuple[str, bytes]]:
        # Heard, not only seen: log-mels [B, 1, M, T] in model units → Griffin-Lim → 16-bit WAVs,
        # each cut to its real frames when a mask [B, T] says where the clip ends.
        waves = vocode(values.float()).cpu()  # [B, S]
        lengths = [waves.shape[1]] * waves.shape[0] if mask is None else real_lengths(mask)
        return [("wav", wave_to_wav(wave[:n])) for wave, n in zip(waves, lengths, strict=True)]

    def problems(self, cfg: Any) -> list[str]:
        p = Problems(cfg)
        d = cfg.data
        p.check(
            d.audio_mels >= 8 and d.audio_frames >= 8,
            "data.audio_mels",
            "audio_mels and audio_frames must be >= 8",
        )
        return p
