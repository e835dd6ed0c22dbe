"""``moving_shapes``: clips of one shape moving left, right, up or down, captioned with its motion.

Each sample is one shape (kind, colour and size drawn as the shapes dataset draws them, rendered by
its :func:`~xmodal.data.shapes.render_image`: same palette, radii, background and noise) moving in
a straight line over ``frames`` frames (``data.moving_shapes.frames``, default :data:`CLIP_FRAMES`), in one
of four directions (:data:`MOTIONS`), covering the same distance whatever the length (10.5 px at
32 px: :data:`SPEED` px per frame over 8 frames, slower over longer clips). Members:

- ``key.mp4``: the clip, H.264 encoded by PyAV at qp 0, 4:4:4 (lossless but for RGB↔YUV
  rounding), :data:`FPS` frames per second;
- ``key.txt``: the canonical caption, ``"a small red circle moves to the left"``;
- ``key.json``: ``captions`` (3 phrasings, each naming size, colour, kind and motion), ``motion``,
  ``shape`` (kind, colour, size), ``path`` (the centre in the first and last frame), ``label``
  (the kind's index, as shapes).

Motion is invisible in one frame, by construction: the centre at frame ``frames // 2`` (the
frame a 1-frame model sees, xmodal/codecs/video.py) is uniform over one square whatever the
direction (the square leaves room for the whole path in any direction), so a single-frame model can
name the shape but guesses the motion (1/4). Sample ``(split, i)`` draws from the shapes sample
generator of ``(data.shapes.seed, split, i)``; clips are byte-identical across runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xmodal.codecs.video import encode_video
from xmodal.console import progress_counter
from xmodal.data.shapes import (
    _SIZE_RADIUS,
    COLOURS,
    KINDS,
    POSITIONS,
    SIZES,
    Shape,
    ShapesSpec,
    render_image,
    sample_rng,
)
from xmodal.data.shards import cached_dataset, publish_dataset, spec_differences, write_sizes, write_tar_shard

CLIP_FRAMES = 8
"""Frames per clip unless ``data.moving_shapes.frames`` says otherwise."""
SPEED = 1.5
"""Pixels per frame at 32 px (scaled with the image side) of a :data:`CLIP_FRAMES` clip: 10.5 px over
its 7 steps. A clip of ``frames`` frames covers the same path (:func:`frame_speed`)."""
FPS = 8
MOTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
"""Direction word → (dx, dy) in image axes (y grows downwards)."""
MOTION_PHRASES: dict[str, str] = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
VERSION = 1
MODALITIES = ("video", "text", "attributes")


def frame_speed(frames: int) -> float:
    """Pixels per frame at 32 px for a clip of ``frames`` frames: the path of a :data:`CLIP_FRAMES`
    clip (``SPEED · 7`` = 10.5 px) spread over its ``frames - 1`` steps, so motion stays visible."""
    if frames == CLIP_FRAMES:
        return SPEED  # exactly the constant: the default spec (and its fingerprint) as it was
    return SPEED * (CLIP_FRAMES - 1) / (frames - 1)


@dataclass(frozen=True)
class MovingShapesSpec:
    """What determines the clips: sizes, seed, frame side and shards of ``data.shapes`` (its other
    fields are unused), the clip length ``frames`` (``data.moving_shapes.frames``) and this module's clip
    constants."""

    shapes: ShapesSpec
    frames: int = CLIP_FRAMES

    def __post_init__(self) -> None:
        if self.frames < 2:
            raise ValueError(
                f"data.moving_shapes.frames: must be >= 2 (motion needs two frames), got {self.frames}"
            )
        if self.shapes.holdout:
            raise ValueError("moving_shapes has no holdout split: leave data.shapes.holdout empty")
        if self.shapes.image_size % 2:
            raise ValueError(
                f"moving_shapes needs an even data.shapes.image_size (H.264), got {self.shapes.image_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        s = self.shapes
        return {
            "n_train": s.n_train,
            "n_val": s.n_val,
            "n_test": s.n_test,
            "seed": s.seed,
            "image_size": s.image_size,
            "samples_per_shard": s.samples_per_shard,
            # Both were constants before data.moving_shapes.frames, so the default spec's dict (and the
            # fingerprint naming its cache) is the same as then.
            "frames": self.frames,
            "speed": frame_speed(self.frames),
            "version": VERSION,
        }

    def fingerprint(self) -> str:
        """Short stable hex hash of the spec, naming the cache directory."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class Clip:
    """One clip's content: the shape's attributes, its motion and its centre in every frame."""

    kind: str
    colour: str
    size: str
    motion: str
    centres: tuple[tuple[float, float], ...]
    radius: float


def sample_clip(rng: np.random.Generator, image_size: int, frames: int = CLIP_FRAMES) -> Clip:
    """Draw a shape, a direction and a ``frames``-frame path whose middle-frame centre does not
    depend on the direction."""
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    kind = KINDS[int(rng.integers(len(KINDS)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    motion = list(MOTIONS)[int(rng.integers(len(MOTIONS)))]
    radius = _SIZE_RADIUS[size] * image_size
    speed = frame_speed(frames) * image_size / 32
    middle = frames // 2
    # The same square for every direction: room for the frames before and after the middle one.
    low = radius + 1 + middle * speed
    high = image_size - radius - 1 - (frames - 1 - middle) * speed
    cx, cy = rng.uniform(low, high, size=2)
    dx, dy = MOTIONS[motion]
    centres = tuple(
        (round(float(cx + (t - middle) * speed * dx), 2), round(float(cy + (t - middle) * speed * dy), 2))
        for t in range(frames)
    )
    return Clip(kind, colour, size, motion, centres, round(float(radius), 2))


def render_clip(clip: Clip, image_size: int) -> np.ndarray:
    """The clip's frames ``[T, H, W, 3]`` uint8, each a one-shape scene drawn by shapes' renderer."""
    frames = []
    for cx, cy in clip.centres:
        cell = min(int(cy * 3 / image_size), 2) * 3 + min(int(cx * 3 / image_size), 2)
        shape = Shape(clip.kind, clip.colour, clip.size, POSITIONS[cell], cx, cy, clip.radius)
        frames.append(np.asarray(render_image([shape], image_size)))  # [H, W, 3]
    return np.stack(frames)  # [T, H, W, 3]


def clip_captions(clip: Clip, rng: np.random.Generator) -> list[str]:
    """Three captions naming size, colour, kind and motion; the first is canonical."""
    what, phrase, word = f"{clip.size} {clip.colour} {clip.kind}", MOTION_PHRASES[clip.motion], clip.motion
    canonical = f"a {what} moves {phrase}"
    pool = [
        f"there is a {what} moving {word}",
        f"a {clip.colour} {clip.kind} that is {clip.size} moves {phrase}",
        f"the {what} goes {phrase}",
        f"a {what} moving {word}",
    ]
    picks = rng.choice(len(pool), size=2, replace=False)
    return [canonical] + [pool[int(i)] for i in picks]


def motion_word(caption: str) -> str | None:
    """The first direction word a caption names (``left``, ``right``, ``up``, ``down``), or None."""
    return next((w for w in caption.split() if w in MOTIONS), None)


def motion_accuracy(hypotheses: list[str], references: list[str]) -> float:
    """Share of generated captions whose motion word is the reference caption's (chance: 1/4)."""
    pairs = list(zip(hypotheses, references, strict=True))
    return sum(motion_word(h) == motion_word(r) for h, r in pairs) / max(len(pairs), 1)


def make_clip_sample(spec: MovingShapesSpec, split: str, index: int) -> dict[str, bytes | str]:
    """One sample: ``__key__``, ``mp4``, ``txt`` (canonical caption) and ``json``."""
    rng = sample_rng(spec.shapes, split, index)
    clip = sample_clip(rng, spec.shapes.image_size, spec.frames)
    caps = clip_captions(clip, rng)
    meta = {
        "captions": caps,
        "motion": clip.motion,
        "shape": {"kind": clip.kind, "colour": clip.colour, "size": clip.size},
        "path": [list(clip.centres[0]), list(clip.centres[-1])],
        "label": KINDS.index(clip.kind),
    }
    return {
        "__key__": f"{split}-{index:07d}",
        "mp4": encode_video(render_clip(clip, spec.shapes.image_size), fps=FPS),
        "txt": caps[0].encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def _cached(out_dir: Path, spec: MovingShapesSpec) -> bool:
    return cached_dataset(out_dir, "moving_shapes", lambda stored: spec_differences(stored, spec.to_dict()))


def synth_moving(out_dir: str | Path, spec: MovingShapesSpec, progress: bool = True) -> Path:
    """Generate the clips of ``spec`` into ``out_dir`` (a cache: returns at once when it is already
    there), atomically like ``shapes.synth``: ``<split>/shard-NNNNNN.tar`` + ``sizes.json``."""
    out_dir = Path(out_dir)
    if _cached(out_dir, spec):
        return out_dir
    per_shard = spec.shapes.samples_per_shard
    sizes = {k: v for k, v in spec.shapes.split_sizes().items()}

    def fill(tmp: Path) -> None:
        shard_sizes: dict[str, dict[str, int]] = {split: {} for split in sizes}
        with progress_counter(progress, "moving shapes", sum(sizes.values())) as advance:
            for split, n in sizes.items():
                (tmp / split).mkdir()
                for first in range(0, n, per_shard):
                    clips = (
                        make_clip_sample(spec, split, i) for i in range(first, min(first + per_shard, n))
                    )
                    name = f"shard-{first // per_shard:06d}.tar"
                    shard_sizes[split][name] = write_tar_shard(tmp / split / name, clips, on_sample=advance)
        write_sizes(tmp, {"spec": spec.to_dict(), "splits": shard_sizes, "modalities": list(MODALITIES)})

    if publish_dataset(out_dir, fill):
        _cached(out_dir, spec)  # another process won the race: it must have written the same spec
    return out_dir
