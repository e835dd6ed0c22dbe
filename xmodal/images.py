"""Image grids for sample files and W&B, and the record a task returns for them."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


@dataclass
class SampleSet:
    """What a task shows after a validation: named image grids and an optional table.

    ``grids`` become ``samples/<name>_step<N>.png`` (and ``<name>_latest.png``) plus W&B images;
    ``table`` (column names, rows of strings) becomes a W&B table and ``samples/<name>_step<N>.md``.
    """

    grids: dict[str, Image.Image] = field(default_factory=dict)
    table_columns: list[str] = field(default_factory=list)
    table_rows: list[list[str]] = field(default_factory=list)
    animations: dict[str, list[Image.Image]] = field(default_factory=dict)
    """Grids over time (one per frame, for clips: ``Modality.animate``), written as
    ``samples/<name>_step<N>.gif`` and logged as W&B videos."""
    files: dict[str, list[SampleFile]] = field(default_factory=dict)
    """Named groups of files (``audio``: WAV clips) → ``samples/<group>_step<N>/<file name>``, and
    W&B audio for ``.wav`` files."""


@dataclass
class SampleFile:
    """One file of a :class:`SampleSet` group: its name (``00_a-red-circle.wav``), caption, bytes."""

    name: str
    caption: str
    data: bytes


def file_slug(text: str, limit: int = 48) -> str:
    """A caption as a safe file-name part: lowercase ASCII letters and digits joined by ``-``."""
    words = "".join(c if c.isascii() and c.isalnum() else " " for c in text.lower()).split()
    slug = "-".join(words)
    if len(slug) > limit:  # cut at a word boundary: "...-and-a" rather than "...-and-a-bl"
        slug = slug[: limit + 1].rsplit("-", 1)[0][:limit]
    return slug or "sample"


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """``[B, C, H, W]`` in [-1, 1] (C = 1 or 3) → uint8 ``[B, H, W, 3]``."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu()
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    return pixels.permute(0, 2, 3, 1).numpy()


def spectrogram_images(mels: torch.Tensor, value_range: tuple[float, float] | None = None) -> torch.Tensor:
    """Log-mel ``[B, 1, M, T]`` → grey images ``[B, 1, M, T]`` in [-1, 1], low bands at the bottom.

    ``value_range`` None stretches each spectrogram over its own min..max (shows any clip's
    structure); a fixed ``(low, high)`` maps every one alike, so an input and its reconstruction
    (or samples from two runs) can be compared by brightness.
    """
    if value_range is None:
        flat = mels.flatten(1)
        low, high = flat.min(1).values[:, None, None, None], flat.max(1).values[:, None, None, None]
        span = (high - low).clamp(min=1e-6)
    else:
        low, span = value_range[0], max(value_range[1] - value_range[0], 1e-6)
    return ((mels.float() - low) / span * 2 - 1).clamp(-1, 1).flip(2)


def image_grid(images: torch.Tensor, columns: int = 8, scale: int = 1, gap: int = 2) -> Image.Image:
    """Images ``[B, C, H, W]`` in [-1, 1] tiled row-major on a white background."""
    pixels = to_pixels(images)
    batch, height, width, _ = pixels.shape
    columns = max(1, min(columns, batch))
    rows = (batch + columns - 1) // columns
    cell_h, cell_w = height * scale, width * scale
    grid = Image.new("RGB", (columns * (cell_w + gap) + gap, rows * (cell_h + gap) + gap), "white")
    for i in range(batch):
        tile = Image.fromarray(np.ascontiguousarray(pixels[i])).resize((cell_w, cell_h), Image.NEAREST)
        grid.paste(tile, (gap + (i % columns) * (cell_w + gap), gap + (i // columns) * (cell_h + gap)))
    return grid


def caption_grid(images: torch.Tensor, captions: list[str], columns: int = 4, scale: int = 2) -> Image.Image:
    """Images ``[B, C, H, W]`` in [-1, 1] in a grid, each with its caption written under it."""
    font = ImageFont.load_default()
    pixels = to_pixels(images)
    batch, height, width, _ = pixels.shape
    cell_w, text_h = width * scale, 58
    rows = (batch + columns - 1) // columns
    grid = Image.new("RGB", (columns * (cell_w + 8), rows * (height * scale + text_h + 8)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(batch):
        x = (i % columns) * (cell_w + 8) + 4
        y = (i // columns) * (height * scale + text_h + 8) + 4
        tile = Image.fromarray(np.ascontiguousarray(pixels[i])).resize(
            (cell_w, height * scale), Image.NEAREST
        )
        grid.paste(tile, (x, y))
        # ~6 px per character in the default bitmap font
        lines = textwrap.wrap(captions[i], width=max(cell_w // 6, 8))[:5]
        draw.multiline_text((x, y + height * scale + 2), "\n".join(lines), fill="black", font=font, spacing=1)
    return grid


def animated_grids(clips: torch.Tensor, grid: Callable[[torch.Tensor], Image.Image]) -> list[Image.Image]:
    """Clips ``[B, T, C, H, W]`` in [-1, 1] → one grid per frame, ``grid(frames [B, C, H, W])``."""
    return [grid(clips[:, t]) for t in range(clips.shape[1])]


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table (pipes in cells escaped)."""

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
