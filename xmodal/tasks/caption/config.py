"""``model`` node of the captioning family (``model.task=caption``): source modality → text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from xmodal.problems import Problems
from xmodal.tasks.config import OptimizerConfig, TaskConfig, check_slot, optimizer_problems

IMAGE_ENCODERS = ("conv", "factorized")
BUILTIN_ENCODERS = ("image", "audio", "video")
"""Modalities with a built-in encoder; any other source needs ``model.encoder._target_``."""


@dataclass
class CaptionConfig(OptimizerConfig, TaskConfig):
    """Seq2seq captioner: a conv image (or log-mel audio) encoder → a causal transformer decoder with
    cross-attention (SDPA), tied embeddings; greedy or batched beam search with a key/value cache."""

    task: str = "caption"
    source: str = "image"
    """Batch role the encoder reads: ``image``, ``audio`` or ``video`` (built-in encoders), or any role whose
    modality has an encoder in ``model.encoder``."""
    target: str = "text"
    """Batch role the decoder produces (``text``)."""
    d_model: int = 128
    encoder_channels: list[int] = field(default_factory=lambda: [64, 128])
    """Conv stage widths: the first stage patchifies, each later one halves the resolution."""
    encoder_patch: int = 4
    """Patch size of the first image-encoder stage."""
    image_encoder: str = "conv"
    """conv: conv stages on RGB; factorized: conv stages on saturated brightness + coarse colour
    (shape detectors that do not depend on colour; with label smoothing and 3000 steps unseen
    colour–kind pairs are named right, BENCHMARKS.md). About twice the conv encoder's step time."""
    audio_patch: int = 2
    """Audio encoder's first stage: 2 = 3×3 stride-2 conv; ≥ 3 = non-overlapping patches of that size."""
    decoder_layers: int = 2
    heads: int = 4
    ffn_mult: int = 4
    dropout: float = 0.0
    """shapes is procedural and plentiful; dropout costs ~25 % CPU time there."""
    lr: float = 2e-3
    max_decode_len: int = 32
    """Longest generated caption in tokens, BOS and EOS included (validation, test, generate)."""
    min_decode_len: int = 1
    """Fewest words before EOS may be generated."""
    beam_size: int = 1
    """1 = greedy; > 1 = batched beam search (validation, test and xmodal-generate)."""
    length_penalty: float = 0.0
    """GNMT length-penalty exponent α for picking the final beam: score / ((5 + len) / 6)^α."""
    decode_cache: bool = True
    """Key/value cache while decoding (same tokens, cost linear instead of quadratic in length)."""
    label_smoothing: float = 0.0
    """Label smoothing of the training cross-entropy (validation/test loss stays plain NLL)."""
    token_dropout: float = 0.0
    """Training only: rate at which teacher-forced input words become ``<unk>`` (word dropout), so
    the decoder reads words from the source rather than from the words before them."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in backward instead of keeping its activations (training only):
    less memory for about one more decoder forward; same loss and gradients. Built-in decoder only
    (a ``model.decoder`` of that class takes ``activation_checkpointing`` among its own keys)."""
    encoder: Any = None
    """``_target_`` of any module called as ``encoder(source [B, ...]) -> tokens [B, N, d_model]``
    (instantiated with the keys given here; interpolate ``${model.d_model}``, ``${data.image_size}``);
    unset = the built-in encoder of ``source`` (``image_encoder`` picks the image one)."""
    decoder: Any = None
    """``_target_`` of a :class:`xmodal.nn.text.TransformerTextDecoder`-compatible decoder
    (``forward``, ``greedy``, ``beam_search``); unset = the built-in one."""

    def roles(self) -> tuple[str, ...]:
        return (self.source, self.target)

    def problems(self, cfg: Any) -> list[str]:
        p = Problems(cfg)
        d = cfg.data
        p.check(self.target == "text", "model.target", "the caption task produces text")
        p.check(self.source != self.target, "model.source", "the caption task cannot read its own target")
        source = source_modality(self.source, cfg)
        if self.encoder is None and source is not None:
            p.check(
                source in BUILTIN_ENCODERS,
                "model.source",
                f"has no built-in encoder for modality {source!r} (built-in: {BUILTIN_ENCODERS}); "
                "give model.encoder._target_",
            )
        p.check(
            self.d_model % max(self.heads, 1) == 0,
            "model.d_model",
            f"must divide by model.heads={self.heads}",
        )
        p.check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        p.check(len(self.encoder_channels) >= 1, "model.encoder_channels", "needs at least one stage")
        p.check(self.beam_size >= 1, "model.beam_size", "must be >= 1 (1 = greedy)")
        p.check(self.audio_patch >= 2, "model.audio_patch", "must be >= 2")
        p.check(0.0 <= self.label_smoothing < 1.0, "model.label_smoothing", "must be in [0, 1)")
        p.check(0.0 <= self.token_dropout < 1.0, "model.token_dropout", "must be in [0, 1)")
        p.check(self.max_decode_len >= 2, "model.max_decode_len", "must be >= 2 (BOS + one token)")
        p.check(
            0 <= self.min_decode_len < self.max_decode_len - 1,
            "model.min_decode_len",
            "must be >= 0 and leave room for EOS within model.max_decode_len",
        )
        if source == "image" and self.encoder is None:
            p.one_of("model.image_encoder", IMAGE_ENCODERS)
            grid_divisor = self.encoder_patch * 2 ** (len(self.encoder_channels) - 1)
            p.check(
                self.encoder_patch >= 1 and d.image_size % grid_divisor == 0,
                "model.encoder_patch",
                f"patch × 2^(stages-1) = {grid_divisor} must divide data.image_size={d.image_size}",
            )
        if source == "video" and self.encoder is None:
            grid_divisor = self.encoder_patch * 2 ** (len(self.encoder_channels) - 1)
            p.check(
                self.encoder_patch >= 1 and d.video_size % grid_divisor == 0,
                "model.encoder_patch",
                f"patch × 2^(stages-1) = {grid_divisor} must divide data.video_size={d.video_size}",
            )
        p.check(
            not (self.activation_checkpointing and self.decoder is not None),
            "model.activation_checkpointing",
            "applies to the built-in decoder; with model.decoder set, give it among model.decoder's keys",
        )
        check_slot(p, "model.encoder", self.encoder)
        check_slot(p, "model.decoder", self.decoder)
        optimizer_problems(p, self)
        return p


def source_modality(source: str, cfg: Any) -> str | None:
    """The modality name of the source role (None when the role does not resolve: reported by the
    role checks)."""
    from xmodal.registry import MODALITIES

    name = dict(cfg.data.roles).get(source, source)
    return name if name in MODALITIES else None
