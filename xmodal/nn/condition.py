"""Condition encoders: one modality of the batch → one vector per sample ``[B, cond_dim]``.

Generative tasks (GAN, VAE) take their condition through this single slot, so text→image,
label→image and audio→image differ only in ``model.condition`` (a config, not a new module).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from xmodal.nn.audio import LogMelEncoder
from xmodal.nn.slots import build_slot


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``tokens [B, N, D]`` over positions where ``mask [B, N]`` is True → ``[B, D]``."""
    weights = mask.to(tokens.dtype)[..., None]  # [B, N, 1]
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class LabelCondition(nn.Module):
    """Class label ``batch["label"] [B]`` → a learned embedding."""

    key = "label"

    def __init__(self, num_classes: int, cond_dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes, cond_dim)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        labels = batch["label"]  # [B]
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(
                f"label conditioning needs labels in [0, model.num_classes={self.num_classes}); "
                f"got {sorted(set(labels.tolist()))[:8]}"
            )
        return self.embed(labels)  # [B, C]


class TextCondition(nn.Module):
    """Caption tokens ``batch["text"] [B, T]`` → a small transformer encoder → masked mean."""

    key = "text"

    def __init__(self, vocab_size: int, pad_id: int, cond_dim: int, d_model: int, heads: int, max_len: int):
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.pos = nn.Parameter(torch.zeros(1, max_len, d_model))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, 2 * d_model, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        # enable_nested_tensor=False: the fast path would drop padded positions and change shapes.
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.proj = nn.Linear(d_model, cond_dim)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        tokens = batch["text"]  # [B, T]
        real = tokens != self.pad_id  # [B, T]
        x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]  # [B, T, D]
        x = self.encoder(x, src_key_padding_mask=~real)  # [B, T, D]
        return self.proj(masked_mean(x, real))  # [B, C]


class AudioCondition(nn.Module):
    """Log-mel ``batch["audio"] [B, 1, M, T]`` → conv encoder → masked mean over time."""

    key = "audio"

    def __init__(self, cond_dim: int, d_model: int, n_mels: int, frames: int):
        super().__init__()
        self.encoder = LogMelEncoder([32, 64], d_model, n_mels, frames)
        self.proj = nn.Linear(d_model, cond_dim)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        tokens = self.encoder(batch["audio"])  # [B, T', D]
        mask = batch.get("audio_mask")
        real = (
            self.encoder.token_mask(mask)
            if mask is not None
            else torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        )
        return self.proj(masked_mean(tokens, real))  # [B, C]


def build_condition_encoder(
    model: Any, vocab_size: int, pad_id: int, max_text_len: int, n_mels: int = 64, frames: int = 64
) -> nn.Module | None:
    """The encoder ``model.condition`` names (or ``model.condition_encoder``'s ``_target_``), or
    None for unconditional models. ``model`` is a typed config with the condition fields."""
    kind, cond_dim = model.condition, model.cond_dim
    if kind == "none":
        return None
    if model.condition_encoder is not None:
        return build_slot(model.condition_encoder, lambda: nn.Identity())
    if kind == "label":
        return LabelCondition(model.num_classes, cond_dim)
    if kind == "text":
        return TextCondition(vocab_size, pad_id, cond_dim, model.d_model, model.heads, max_text_len)
    if kind == "audio":
        return AudioCondition(cond_dim, model.d_model, n_mels, frames)
    raise ValueError(f"model.condition: unknown condition {kind!r}")
