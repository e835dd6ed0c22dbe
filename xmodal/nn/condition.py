"""Condition encoders: one modality of the batch → one vector per sample ``[B, cond_dim]``.

Generative tasks (GAN, VAE) take their condition through this single slot, so text→image,
label→image and audio→image differ only in ``model.condition`` (a config, not a new module).
``encoder(batch)`` is the pooled vector; :func:`encode_condition` also gives the per-token
features and their mask (``Encoded``) for fusions that attend over them (``model.fusion``). A list
``model.condition=[text, audio]`` builds one encoder per condition (:class:`MultiCondition`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from xmodal.nn.audio import LogMelEncoder
from xmodal.nn.slots import build_slot


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``tokens [B, N, D]`` over positions where ``mask [B, N]`` is True → ``[B, D]``."""
    weights = mask.to(tokens.dtype)[..., None]  # [B, N, 1]
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)


@dataclass
class Encoded:
    """A condition as both views the fusions read."""

    pooled: torch.Tensor
    """``[B, cond_dim]``: what ``encoder(batch)`` returns."""
    tokens: torch.Tensor
    """``[B, T, cond_dim]``: per-token features (one token for a label or a custom encoder)."""
    mask: torch.Tensor
    """``[B, T]`` bool, True = a real token (False: caption padding, audio frames past the clip)."""


def single_token(pooled: torch.Tensor) -> Encoded:
    """A pooled vector ``[B, C]`` as a one-token sequence (encoders with no token axis)."""
    mask = torch.ones(pooled.shape[0], 1, dtype=torch.bool, device=pooled.device)  # [B, 1]
    return Encoded(pooled, pooled[:, None], mask)


def encode_condition(encoder: nn.Module, batch: dict[str, Any]) -> Encoded:
    """Pooled and token views of ``encoder``'s condition; an encoder without ``encode`` (a
    ``model.condition_encoder`` ``_target_`` returning ``[B, cond_dim]``) gives one token."""
    encode = getattr(encoder, "encode", None)
    return encode(batch) if callable(encode) else single_token(encoder(batch))


class LabelCondition(nn.Module):
    """Class label ``batch["label"] [B]`` → a learned embedding."""

    key = "label"

    def __init__(self, num_classes: int, cond_dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes, cond_dim)

    def encode(self, batch: dict[str, Any]) -> Encoded:
        return single_token(self(batch))

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

    def __init__(
        self,
        vocab_size: int,
        pad_id: int,
        cond_dim: int,
        d_model: int,
        heads: int,
        max_len: int,
        layers: int = 1,
        position_std: float = 0.02,
    ):
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.pos = nn.Parameter(torch.zeros(1, max_len, d_model))
        nn.init.normal_(self.pos, std=position_std)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, 2 * d_model, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        # enable_nested_tensor=False: the fast path would drop padded positions and change shapes.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.proj = nn.Linear(d_model, cond_dim)

    def features(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder outputs ``[B, T, D]`` and the real-token mask ``[B, T]``."""
        tokens = batch["text"]  # [B, T]
        real = tokens != self.pad_id  # [B, T]
        x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]  # [B, T, D]
        return self.encoder(x, src_key_padding_mask=~real), real  # [B, T, D], [B, T]

    def encode(self, batch: dict[str, Any]) -> Encoded:
        x, real = self.features(batch)
        # Pooled as forward pools (mean, then proj), so both views agree bit for bit.
        return Encoded(self.proj(masked_mean(x, real)), self.proj(x), real)  # [B, C], [B, T, C], [B, T]

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        x, real = self.features(batch)
        return self.proj(masked_mean(x, real))  # [B, C]


class AudioCondition(nn.Module):
    """Log-mel ``batch["audio"] [B, 1, M, T]`` → conv encoder → masked mean over time."""

    key = "audio"

    def __init__(self, cond_dim: int, d_model: int, n_mels: int, frames: int):
        super().__init__()
        self.encoder = LogMelEncoder([32, 64], d_model, n_mels, frames)
        self.proj = nn.Linear(d_model, cond_dim)

    def features(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder tokens over time ``[B, T', D]`` and the real-token mask ``[B, T']``."""
        tokens = self.encoder(batch["audio"])  # [B, T', D]
        mask = batch.get("audio_mask")
        real = (
            self.encoder.token_mask(mask)
            if mask is not None
            else torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        )
        return tokens, real

    def encode(self, batch: dict[str, Any]) -> Encoded:
        x, real = self.features(batch)
        return Encoded(self.proj(masked_mean(x, real)), self.proj(x), real)  # [B, C], [B, T', C], [B, T']

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        tokens, real = self.features(batch)
        return self.proj(masked_mean(tokens, real))  # [B, C]


class MultiCondition(nn.Module):
    """Several conditions (``model.condition=[text, audio]``), each through its own encoder.

    Pooled vectors are summed, so the result keeps the ``[B, cond_dim]`` contract of one encoder
    (D's projection, the VAE, cbn/concat/film read it unchanged); since every built-in encoder
    ends in its own linear projection, the sum is a concatenation followed by one linear layer.
    Token sequences are concatenated along T with their masks, each offset by a learned
    per-condition embedding so attention can tell a caption token from an audio frame.
    """

    def __init__(self, encoders: Sequence[nn.Module], cond_dim: int):
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.kind = nn.Parameter(torch.zeros(len(self.encoders), cond_dim))
        nn.init.normal_(self.kind, std=0.02)

    def encode(self, batch: dict[str, Any]) -> Encoded:
        parts = [encode_condition(enc, batch) for enc in self.encoders]
        pooled = torch.stack([p.pooled for p in parts]).sum(0)  # [B, C]
        tokens = torch.cat([p.tokens + self.kind[i] for i, p in enumerate(parts)], dim=1)  # [B, ΣT, C]
        mask = torch.cat([p.mask for p in parts], dim=1)  # [B, ΣT]
        return Encoded(pooled, tokens, mask)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return torch.stack([enc(batch) for enc in self.encoders]).sum(0)  # [B, C]


def build_condition_encoder(
    model: Any, vocab_size: int, pad_id: int, max_text_len: int, n_mels: int = 64, frames: int = 64
) -> nn.Module | None:
    """The encoder ``model.condition`` names (or ``model.condition_encoder``'s ``_target_``), or
    None for unconditional models; a list of names builds a :class:`MultiCondition`. ``model`` is
    a typed config with the condition fields (``ConditionConfig``: ``conditions()`` lists them)."""
    kinds = model.conditions()
    if not kinds:
        return None
    if model.condition_encoder is not None:
        return build_slot(model.condition_encoder, lambda: nn.Identity())
    built = [
        _builtin_encoder(kind, model, vocab_size, pad_id, max_text_len, n_mels, frames) for kind in kinds
    ]
    # One condition stays a bare encoder: its parameter names (and old checkpoints) are unchanged.
    return built[0] if len(built) == 1 else MultiCondition(built, model.cond_dim)


def _builtin_encoder(
    kind: str, model: Any, vocab_size: int, pad_id: int, max_text_len: int, n_mels: int, frames: int
) -> nn.Module:
    cond_dim = model.cond_dim
    if kind == "label":
        return LabelCondition(model.num_classes, cond_dim)
    if kind == "text":
        return TextCondition(
            vocab_size,
            pad_id,
            cond_dim,
            model.d_model,
            model.heads,
            max_text_len,
            model.text_layers,
            model.text_position_std,
        )
    if kind == "audio":
        return AudioCondition(cond_dim, model.d_model, n_mels, frames)
    raise ValueError(f"model.condition: unknown condition {kind!r}")
