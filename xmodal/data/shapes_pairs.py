"""``shapes_pairs``: paired images for image → image translation, from the shapes generator.

Each sample is one shapes scene exactly as xmodal/data/shapes.py makes it (same scene sampling,
rendering, captions, JSON and seeds: sample ``(split, i)`` is the shapes sample ``(split, i)`` of
the same ``ShapesSpec``), as a pair:

- ``key.tgt.png``: the scene as shapes renders it (filled shapes on a noisy dark background);
- ``key.src.png``: the same image with each shape's interior replaced by background, leaving its
  outline (``outline_px`` wide, 1 px at 32 px) in the shape's colour.

So the translation is "fill each closed outline with its colour": local along the outline, but a
large shape's interior lies up to ~5 px (at 32 px) from any outline pixel, so G needs context
beyond a 3×3 neighbourhood, and copying the source (the identity baseline) leaves every interior
dark. Pixels outside the shapes are identical in source and target. ``key.txt`` (canonical
caption) and ``key.json`` (captions, shapes, ``label`` = kind of the first shape, which the FID
feature classifier learns) come from shapes unchanged.

The outline is found from the rendered pixels: every palette colour has a channel ≥ 190 while the
background stays ≤ 32 (26 + noise), so a threshold halfway separates shapes from background
without touching the renderer. The interior is filled from a rendering of the empty scene (the
same background and noise statistics).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from xmodal.console import progress_counter
from xmodal.data.shapes import COLOURS, ShapesSpec, make_sample, render_image
from xmodal.data.shards import (
    cached_dataset,
    publish_dataset,
    spec_differences,
    write_sizes,
    write_tar_shard,
)

PAIRING = "outline->filled"
VERSION = 1
FOREGROUND_LEVEL = min(max(rgb) for rgb in COLOURS.values()) // 2
"""A pixel with a channel above this is part of a shape (palette ≥ 190, background ≤ 32)."""
MODALITIES = ("image", "text", "attributes")


@dataclass(frozen=True)
class ShapesPairsSpec:
    """Everything that determines the paired dataset: the scenes' ``ShapesSpec`` and the pairing."""

    shapes: ShapesSpec

    @property
    def outline_px(self) -> int:
        """Outline width: 1 px per 32 px of image side."""
        return max(1, self.shapes.image_size // 32)

    def to_dict(self) -> dict[str, Any]:
        return {"shapes": self.shapes.to_dict(), "pairing": PAIRING, "version": VERSION}

    def fingerprint(self) -> str:
        """Short stable hex hash of the spec, naming the cache directory."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def outline_only(filled: Image.Image, background: Image.Image, width: int) -> Image.Image:
    """``filled`` with each shape's interior (shape pixels ``width`` px or more inside its edge)
    taken from ``background``: what is left of a shape is its outline."""
    pixels = np.asarray(filled)  # [H, W, 3] uint8
    mask = Image.fromarray(((pixels.max(axis=2) > FOREGROUND_LEVEL) * 255).astype(np.uint8))  # [H, W]
    interior = np.asarray(mask.filter(ImageFilter.MinFilter(2 * width + 1))) > 0  # eroded by width px
    out = np.where(interior[..., None], np.asarray(background), pixels)  # [H, W, 3]
    return Image.fromarray(out.astype(np.uint8), mode="RGB")


def make_pair(spec: ShapesPairsSpec, split: str, index: int) -> dict[str, bytes | str]:
    """One sample: ``__key__``, ``src.png`` (outlines), ``tgt.png`` (filled), ``txt``, ``json``."""
    sample = make_sample(spec.shapes, split, index)
    filled = Image.open(io.BytesIO(sample["png"])).convert("RGB")
    background = render_image([], spec.shapes.image_size)
    source = io.BytesIO()
    # Level 1 as shapes uses: the background noise is incompressible anyway.
    outline_only(filled, background, spec.outline_px).save(source, format="PNG", compress_level=1)
    return {
        "__key__": sample["__key__"],
        "src.png": source.getvalue(),
        "tgt.png": sample["png"],
        "txt": sample["txt"],
        "json": sample["json"],
    }


def _cached(out_dir: Path, spec: ShapesPairsSpec) -> bool:
    return cached_dataset(out_dir, "shapes_pairs", lambda stored: spec_differences(stored, spec.to_dict()))


def synth_pairs(out_dir: str | Path, spec: ShapesPairsSpec, progress: bool = True) -> Path:
    """Generate the paired dataset of ``spec`` into ``out_dir`` (a cache: returns at once when it
    is already there), atomically like ``shapes.synth``: ``<split>/shard-NNNNNN.tar`` + ``sizes.json``."""
    out_dir = Path(out_dir)
    if _cached(out_dir, spec):
        return out_dir

    def fill(tmp: Path) -> None:
        sizes = spec.shapes.split_sizes()
        per_shard = spec.shapes.samples_per_shard
        with progress_counter(progress, "shapes pairs", sum(sizes.values())) as advance:
            shard_sizes: dict[str, dict[str, int]] = {}
            for split, n in sizes.items():
                (tmp / split).mkdir()
                shard_sizes[split] = {}
                for start in range(0, n, per_shard):
                    name = f"shard-{start // per_shard:06d}.tar"
                    samples = (make_pair(spec, split, i) for i in range(start, min(start + per_shard, n)))
                    shard_sizes[split][name] = write_tar_shard(tmp / split / name, samples, on_sample=advance)
        write_sizes(tmp, {"spec": spec.to_dict(), "splits": shard_sizes, "modalities": list(MODALITIES)})

    if publish_dataset(out_dir, fill):
        _cached(out_dir, spec)  # another process won the race: it must have written the same spec
    return out_dir
