"""The built-in procedural "shapes" dataset: image + captions + attributes + audio, offline and seeded.

A scene holds 1..``max_shapes`` shapes, each in a different cell of a 3×3 grid. A shape has a kind
(circle, square, triangle, diamond), a colour (6), a size (small, large) and a grid position (9).
Every sample is a pure function of ``(spec.seed, split, index)``: the random generator is
``np.random.default_rng(np.random.SeedSequence([seed, crc32(split), index]))`` (never Python's
salted ``hash``), so any process can regenerate any sample, and the shards are byte-identical
across runs (tar members carry a fixed mtime).

Canonical order: shapes sorted by grid cell, row-major (top left first). The first caption, the
``.txt`` member and audio slot ``i`` all follow it, ``label`` is the kind of the first shape and
``colour`` (in the JSON) its colour's index in :data:`COLOURS`.

Audio encoding (``render_audio``): the clip (``audio_seconds × sample_rate`` int16 mono samples)
is split into ``max_shapes`` equal time slots; any remainder at the end is silence. Slot ``i``
plays shape ``i`` of the canonical order as a sum of three sinusoids, one per attribute, taken from
disjoint frequency bands (all below 7 kHz, so 16 kHz audio holds them):

- kind:     circle 300, square 450, triangle 600, diamond 750 Hz            (``KIND_HZ``)
- colour:   red 1100, green 1400, blue 1700, yellow 2000, purple 2300,
            white 2600 Hz                                                  (``COLOUR_HZ``)
- position: 3400 + 400·cell Hz for cells 0..8 in row-major order,
            i.e. 3400 (top left) .. 6600 (bottom right)                    (``POSITION_HZ``)
- size:     the amplitude of each sinusoid, small 0.15, large 0.30 of full scale (``SIZE_AMPLITUDE``)

Each slot has a 10 ms raised-cosine fade in and out (no clicks, and slots stay separable on a
spectrogram); a slot with no shape (fewer shapes than ``max_shapes``) is silent. There is no noise:
an audio→text model must learn to read a band-limited code, which is learnable yet not trivial
through a log-mel front end (the position tones sit ~5 mel bins apart at 64 mels).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from xmodal.codecs.wav import wav_bytes
from xmodal.console import progress_counter
from xmodal.data.shards import (
    cached_dataset,
    publish_dataset,
    write_sizes,
    write_tar_shard,
)

CONTENT_VERSION = 2
"""What a sample holds: 2 added ``colour`` to the JSON. Part of the fingerprint (so a cache of
version 1 is regenerated beside it, never read as if it had the field)."""

KINDS: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 100, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 205),
    "white": (240, 240, 240),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
# A preposition per cell so captions read naturally; every phrase is unique, so captions parse back.
POSITION_PHRASES: dict[str, str] = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
MODALITIES: tuple[str, ...] = ("image", "text", "attributes", "audio")

LANGUAGES: tuple[str, ...] = ("en", "zh")
# Chinese captions (``language="zh"``): a small vocabulary of colours, kinds, sizes and positions.
# Every template writes the colour right before the kind (红色圆形, 红色的圆形), so the shapes a
# caption names can be read back (:func:`zh_shape_mentions`).
ZH_COLOURS: dict[str, str] = {
    "red": "红色",
    "green": "绿色",
    "blue": "蓝色",
    "yellow": "黄色",
    "purple": "紫色",
    "white": "白色",
}
ZH_KINDS: dict[str, str] = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "diamond": "菱形"}
ZH_SIZES: dict[str, str] = {"small": "小", "large": "大"}
ZH_POSITIONS: dict[str, str] = {
    "top left": "左上角",
    "top": "上方",
    "top right": "右上角",
    "left": "左边",
    "center": "中间",
    "right": "右边",
    "bottom left": "左下角",
    "bottom": "下方",
    "bottom right": "右下角",
}

# Audio code (see the module docstring): disjoint bands, all < 7 kHz.
KIND_HZ: dict[str, float] = {"circle": 300.0, "square": 450.0, "triangle": 600.0, "diamond": 750.0}
COLOUR_HZ: dict[str, float] = {c: 1100.0 + 300.0 * i for i, c in enumerate(COLOURS)}
POSITION_HZ: dict[str, float] = {p: 3400.0 + 400.0 * i for i, p in enumerate(POSITIONS)}
SIZE_AMPLITUDE: dict[str, float] = {"small": 0.15, "large": 0.30}
FADE_SECONDS = 0.01

# Radius as a fraction of the image side; a large shape still fits inside its grid cell (1/6 half-width).
_SIZE_RADIUS: dict[str, float] = {"small": 0.08, "large": 0.15}
_BACKGROUND = np.array([18, 18, 26], dtype=np.int16)  # dark blue-grey
_NOISE_AMPLITUDE = 6  # ± grey levels, mild: shapes stay obvious, the background is not a constant
_SPLITS = ("train", "val", "test")
HOLDOUT_SPLIT = "holdout"


@dataclass(frozen=True)
class Shape:
    """One shape of a scene; ``cx``, ``cy`` and ``radius`` are in pixels of the rendered image."""

    kind: str
    colour: str
    size: str
    position: str
    cx: float
    cy: float
    radius: float


def _normalise_pair(pair: str) -> str:
    return " ".join(str(pair).lower().split())


@dataclass(frozen=True)
class ShapesSpec:
    """Everything that determines the generated dataset (two equal specs give identical shards).

    Attributes:
        n_train, n_val, n_test: samples in the train, val and test splits.
        seed: dataset seed; every sample derives from ``(seed, split, index)``.
        image_size: side of the square RGB image, in pixels.
        max_shapes: each image holds 1..max_shapes shapes, in distinct cells of a 3×3 grid (≤ 9).
        audio_seconds: clip length; ``sample_rate``: its rate in Hz (≥ 14 kHz: tones go up to 6.6 kHz).
        samples_per_shard: samples per tar shard.
        holdout: "colour kind" pairs (e.g. ``("red circle",)``) that never occur in train/val/test;
            when non-empty an extra split "holdout" of ``n_test`` samples is generated, in which
            every image holds at least one held-out pair. Stored normalised (lowercase, sorted).
        language: caption language, ``en`` or ``zh``; scenes, images and audio do not depend on
            it. Left out of :meth:`to_dict` when ``en``, so English specs keep their fingerprint.
    """

    n_train: int = 8000
    n_val: int = 512
    n_test: int = 512
    seed: int = 0
    image_size: int = 64
    max_shapes: int = 2
    audio_seconds: float = 0.5
    sample_rate: int = 16000
    samples_per_shard: int = 1000
    holdout: tuple[str, ...] = ()
    language: str = "en"

    def __post_init__(self) -> None:
        # Coerce what configs hand us (lists, ints for floats) so equal specs compare and hash equal.
        object.__setattr__(self, "holdout", tuple(sorted({_normalise_pair(p) for p in self.holdout})))
        object.__setattr__(self, "audio_seconds", float(self.audio_seconds))
        for name in ("n_train", "n_val", "n_test", "seed", "image_size", "max_shapes", "sample_rate"):
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "samples_per_shard", int(self.samples_per_shard))
        object.__setattr__(self, "language", str(self.language))
        self._validate()

    def _validate(self) -> None:
        problems = []
        if self.n_train < 1 or self.n_val < 0 or self.n_test < 0:
            problems.append("n_train must be >= 1, n_val and n_test >= 0")
        if self.image_size < 16:
            problems.append(f"image_size must be >= 16, got {self.image_size}")
        if not 1 <= self.max_shapes <= len(POSITIONS):
            problems.append(f"max_shapes must be in 1..{len(POSITIONS)}, got {self.max_shapes}")
        if self.audio_seconds <= 0:
            problems.append(f"audio_seconds must be > 0, got {self.audio_seconds}")
        top_hz = max(POSITION_HZ.values())
        if self.sample_rate <= 2 * top_hz:
            problems.append(f"sample_rate must exceed {2 * top_hz:.0f} Hz (tones reach {top_hz:.0f} Hz)")
        if self.samples_per_shard < 1:
            problems.append("samples_per_shard must be >= 1")
        if self.language not in LANGUAGES:
            problems.append(f"language must be one of {LANGUAGES}, got {self.language!r}")
        all_pairs = {f"{c} {k}" for c in COLOURS for k in KINDS}
        unknown = [p for p in self.holdout if p not in all_pairs]
        if unknown:
            problems.append(
                f"holdout pairs {unknown} are not 'colour kind' (colours {list(COLOURS)}, kinds {list(KINDS)})"
            )
        elif len(self.holdout) == len(all_pairs):
            problems.append("holdout cannot hold out every colour-kind pair")
        if problems:
            raise ValueError("invalid ShapesSpec: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ShapesSpec:
        """Build a spec from a plain mapping (a config node, ``sizes.json``); unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k != "content"}  # what the samples hold, not a setting
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown ShapesSpec fields {unknown}; known: {sorted(names)}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples become lists) and ``content`` (:data:`CONTENT_VERSION`);
        ``language`` only when not the default ``en`` (English specs never stored it)."""
        values = self.all_fields()
        if self.language == "en":
            del values["language"]
        values["content"] = CONTENT_VERSION
        return values

    def all_fields(self) -> dict[str, Any]:
        values = asdict(self)
        values["holdout"] = list(self.holdout)
        return values

    def fingerprint(self) -> str:
        """Short stable hex hash of all fields, e.g. to name a cache directory."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]

    def split_sizes(self) -> dict[str, int]:
        """Samples per split, in generation order; splits with 0 samples are left out."""
        sizes = {"train": self.n_train, "val": self.n_val, "test": self.n_test}
        if self.holdout:
            sizes[HOLDOUT_SPLIT] = self.n_test
        return {split: n for split, n in sizes.items() if n > 0}


# ---------------------------------------------------------------------------------------------
# Scenes


def _cell_geometry(cell: int, image_size: int) -> tuple[float, float, float]:
    """Centre x, centre y and half-width of grid cell ``cell`` (row-major), in pixels."""
    row, col = divmod(cell, 3)
    side = image_size / 3
    return (col + 0.5) * side, (row + 0.5) * side, side / 2


def _allowed_pairs(holdout: Sequence[str]) -> list[tuple[str, str]]:
    held = set(holdout)
    return [(c, k) for c in COLOURS for k in KINDS if f"{c} {k}" not in held]


def sample_scene(rng: np.random.Generator, spec: ShapesSpec, require_holdout: bool = False) -> list[Shape]:
    """Draw 1..max_shapes shapes in distinct grid cells, returned in canonical (row-major) order.

    Without ``require_holdout`` no shape uses a held-out colour-kind pair; with it, one randomly
    chosen shape does (the others are unconstrained), so every holdout image contains one.
    """
    if require_holdout and not spec.holdout:
        raise ValueError("require_holdout=True needs a spec with holdout pairs")
    n = int(rng.integers(1, spec.max_shapes + 1))
    cells = np.sort(rng.choice(len(POSITIONS), size=n, replace=False))
    forced = int(rng.integers(n)) if require_holdout else -1
    allowed = _allowed_pairs(spec.holdout)
    everything = _allowed_pairs(())
    scene = []
    for i, cell in enumerate(cells):
        if i == forced:
            colour, kind = spec.holdout[int(rng.integers(len(spec.holdout)))].split(" ")
        else:
            pool = everything if require_holdout else allowed
            colour, kind = pool[int(rng.integers(len(pool)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        cx, cy, half = _cell_geometry(int(cell), spec.image_size)
        radius = _SIZE_RADIUS[size] * spec.image_size
        # Jitter inside the cell, keeping the whole shape in it so positions stay unambiguous.
        slack = max(half - radius - 0.5, 0.0)
        dx, dy = rng.uniform(-slack, slack, size=2)
        scene.append(
            Shape(
                kind=kind,
                colour=colour,
                size=size,
                position=POSITIONS[int(cell)],
                cx=round(float(cx + dx), 2),
                cy=round(float(cy + dy), 2),
                radius=round(float(radius), 2),
            )
        )
    return scene


def _scene_seed(scene: Sequence[Shape]) -> int:
    """Stable 64-bit seed from a scene's content (for noise that is deterministic per image)."""
    return int.from_bytes(
        hashlib.blake2b(repr(list(scene)).encode("utf-8"), digest_size=8).digest(), "little"
    )


def _outline(shape: Shape) -> list[tuple[float, float]]:
    """Polygon vertices of a non-circle shape; each fits the box ``centre ± radius``."""
    x, y, r = shape.cx, shape.cy, shape.radius
    if shape.kind == "square":
        h = 0.8 * r  # area close to the circle's
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if shape.kind == "triangle":
        return [(x, y - r), (x + r, y + r), (x - r, y + r)]
    if shape.kind == "diamond":
        return [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]
    raise ValueError(f"unknown shape kind {shape.kind!r}; known: {KINDS}")


def render_image(scene: Sequence[Shape], image_size: int) -> Image.Image:
    """Draw a scene: filled shapes on a dark background, plus mild grey noise seeded by the scene."""
    image = Image.new("RGB", (image_size, image_size), tuple(int(v) for v in _BACKGROUND))
    draw = ImageDraw.Draw(image)
    for shape in scene:
        fill = COLOURS[shape.colour]
        if shape.kind == "circle":
            r = shape.radius
            draw.ellipse([shape.cx - r, shape.cy - r, shape.cx + r, shape.cy + r], fill=fill)
        else:
            draw.polygon(_outline(shape), fill=fill)
    rng = np.random.default_rng(_scene_seed(scene))
    noise = rng.integers(
        -_NOISE_AMPLITUDE, _NOISE_AMPLITUDE + 1, size=(image_size, image_size, 1)
    )  # [H, W, 1]
    pixels = np.asarray(image, dtype=np.int16) + noise  # [H, W, 3]; grey noise keeps hues intact
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


# ---------------------------------------------------------------------------------------------
# Captions


def _desc(s: Shape) -> str:
    return f"{s.size} {s.colour} {s.kind}"


def _pos(s: Shape) -> str:
    return POSITION_PHRASES[s.position]


def _canonical(shapes: Sequence[Shape]) -> str:
    return " and ".join(f"a {_desc(s)} {_pos(s)}" for s in shapes)


# Alternative phrasings; each maps an ordered list of shapes to one caption.
_ALTERNATIVES: tuple[Callable[[Sequence[Shape]], str], ...] = (
    lambda ss: "there is " + " and ".join(f"a {_desc(s)} {_pos(s)}" for s in ss),
    lambda ss: " and ".join(f"{_pos(s)} there is a {_desc(s)}" for s in ss),
    lambda ss: "a picture of " + " and ".join(f"a {_desc(s)} {_pos(s)}" for s in ss),
    lambda ss: "an image showing " + " and ".join(f"a {_desc(s)} {_pos(s)}" for s in ss),
    lambda ss: " and ".join(f"{_pos(s)} a {_desc(s)}" for s in ss),
    lambda ss: " and ".join(f"a {s.colour} {s.kind} {_pos(s)} that is {s.size}" for s in ss),
)


def _zh(s: Shape) -> tuple[str, str, str, str]:
    """(position, size, colour, kind) of a shape in Chinese."""
    return ZH_POSITIONS[s.position], ZH_SIZES[s.size], ZH_COLOURS[s.colour], ZH_KINDS[s.kind]


def _zh_join(shapes: Sequence[Shape], phrase: Callable[[str, str, str, str], str]) -> str:
    return "，".join(phrase(*_zh(s)) for s in shapes)


def _canonical_zh(shapes: Sequence[Shape]) -> str:
    return _zh_join(shapes, lambda p, z, c, k: f"{p}有一个{z}的{c}{k}")  # 左上角有一个小的红色圆形


_ALTERNATIVES_ZH: tuple[Callable[[Sequence[Shape]], str], ...] = (
    lambda ss: "图中" + _canonical_zh(ss),
    lambda ss: _zh_join(ss, lambda p, z, c, k: f"一个{z}的{c}{k}在{p}"),
    lambda ss: _zh_join(ss, lambda p, z, c, k: f"{p}是一个{z}{c}{k}"),
    lambda ss: "这张图片里" + _canonical_zh(ss),
    lambda ss: _zh_join(ss, lambda p, z, c, k: f"{p}有一个{c}{k}，它是{z}的"),
    lambda ss: _zh_join(ss, lambda p, z, c, k: f"在{p}有一个{z}的{c}{k}"),
)
_ZH_MENTION = re.compile(f"({'|'.join(ZH_COLOURS.values())})的?({'|'.join(ZH_KINDS.values())})")


def zh_shape_mentions(caption: str) -> list[tuple[str, str]]:
    """The (colour, kind) pairs a Chinese caption names, in English and in order:
    ``"左上角有一个小的红色圆形"`` → ``[("red", "circle")]`` (for key-word accuracy)."""
    colour = {v: k for k, v in ZH_COLOURS.items()}
    kind = {v: k for k, v in ZH_KINDS.items()}
    return [(colour[c], kind[k]) for c, k in _ZH_MENTION.findall(caption)]


def zh_keyword_accuracy(
    hypotheses: Sequence[str], scenes: Sequence[Sequence[tuple[str, str]]]
) -> dict[str, float]:
    """Key-word accuracy of Chinese captions against their scenes' ``(colour, kind)`` lists: the
    fraction of captions that name exactly the scene's colours (``colour``), kinds (``kind``), and
    colour–kind pairs (``pair``), each compared as a multiset (a caption may list shapes in either
    order). Chance for one shape: 1/6, 1/4, 1/24."""
    hits = {"colour": 0, "kind": 0, "pair": 0}
    for hypothesis, truth in zip(hypotheses, scenes, strict=True):
        named = zh_shape_mentions(hypothesis)
        hits["colour"] += sorted(c for c, _ in named) == sorted(c for c, _ in truth)
        hits["kind"] += sorted(k for _, k in named) == sorted(k for _, k in truth)
        hits["pair"] += sorted(named) == sorted(tuple(p) for p in truth)
    return {name: count / max(len(hypotheses), 1) for name, count in hits.items()}


def captions(scene: Sequence[Shape], rng: np.random.Generator, language: str = "en") -> list[str]:
    """3–5 distinct lowercase captions; the first is canonical (row-major order, fixed template).

    The others are drawn from alternative templates applied to the canonical order and, for
    several shapes, to the reversed order (which also gives a reversed canonical caption).
    ``language="zh"``: the same, from Chinese templates (same draws from ``rng``).
    """
    if not scene:
        raise ValueError("a scene needs at least one shape")
    canonical_of, alternatives = (
        (_canonical_zh, _ALTERNATIVES_ZH) if language == "zh" else (_canonical, _ALTERNATIVES)
    )
    canonical = canonical_of(scene)
    orders = [list(scene)] + ([list(reversed(scene))] if len(scene) > 1 else [])
    pool = [template(order) for order in orders for template in alternatives]
    if len(scene) > 1:
        pool.append(canonical_of(orders[1]))
    pool = [c for c in dict.fromkeys(pool) if c != canonical]  # dedupe, keep order (determinism)
    extra = int(rng.integers(2, 5))  # 2..4 extra → 3..5 captions in all
    picks = rng.choice(len(pool), size=min(extra, len(pool)), replace=False)
    return [canonical] + [pool[int(i)] for i in picks]


def parse_caption(caption: str) -> list[tuple[str, str, str, str]] | None:
    """Invert the canonical template: ``[(size, colour, kind, position), ...]``, or None if it is not one.

    Lets generated captions be scored by attribute accuracy, not only by n-gram overlap.
    """
    by_phrase = {phrase: pos for pos, phrase in POSITION_PHRASES.items()}
    shapes = []
    for part in " ".join(caption.split()).split(" and "):
        words = part.split(" ")
        if len(words) < 5 or words[0] != "a":
            return None
        size, colour, kind, phrase = words[1], words[2], words[3], " ".join(words[4:])
        if size not in SIZES or colour not in COLOURS or kind not in KINDS or phrase not in by_phrase:
            return None
        shapes.append((size, colour, kind, by_phrase[phrase]))
    return shapes


# ---------------------------------------------------------------------------------------------
# Audio


def render_audio(scene: Sequence[Shape], spec: ShapesSpec) -> np.ndarray:
    """int16 mono clip of ``round(audio_seconds * sample_rate)`` samples encoding the scene (module doc)."""
    total = int(round(spec.audio_seconds * spec.sample_rate))
    clip = np.zeros(total, dtype=np.float64)  # [N]
    slot = total // spec.max_shapes
    if slot == 0:
        return clip.astype(np.int16)
    t = np.arange(slot) / spec.sample_rate  # [S] seconds
    fade = min(int(FADE_SECONDS * spec.sample_rate), slot // 2)
    envelope = np.ones(slot)  # [S]
    if fade > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / fade)  # [F] raised cosine 0 → 1
        envelope[:fade] = ramp
        envelope[slot - fade :] = ramp[::-1]
    for i, shape in enumerate(scene[: spec.max_shapes]):
        freqs = np.array([KIND_HZ[shape.kind], COLOUR_HZ[shape.colour], POSITION_HZ[shape.position]])  # [3]
        tones = np.sin(2 * np.pi * freqs[:, None] * t[None, :]).sum(axis=0)  # [S]
        clip[i * slot : (i + 1) * slot] = SIZE_AMPLITUDE[shape.size] * tones * envelope
    return np.round(clip * 32767).astype(np.int16)  # peak ≤ 3 × 0.30 < 1: never clips


# ---------------------------------------------------------------------------------------------
# Samples and shards


def sample_rng(spec: ShapesSpec, split: str, index: int) -> np.random.Generator:
    """The generator of one sample: independent per (seed, split, index), stable across processes."""
    return np.random.default_rng(
        np.random.SeedSequence([spec.seed, zlib.crc32(split.encode("utf-8")), index])
    )


def make_sample(spec: ShapesSpec, split: str, index: int) -> dict[str, bytes | str]:
    """One webdataset sample: ``__key__``, ``png``, ``txt`` (canonical caption), ``json``, ``wav``."""
    if split == HOLDOUT_SPLIT and not spec.holdout:
        raise ValueError("split 'holdout' exists only for a spec with holdout pairs")
    rng = sample_rng(spec, split, index)
    scene = sample_scene(rng, spec, require_holdout=split == HOLDOUT_SPLIT)
    caps = captions(scene, rng, spec.language)
    png = io.BytesIO()
    # Level 1: 2.5× faster than the default and no bigger, since the noise is incompressible anyway.
    render_image(scene, spec.image_size).save(png, format="PNG", compress_level=1)
    meta = {
        "captions": caps,
        "shapes": [asdict(s) for s in scene],
        "label": KINDS.index(scene[0].kind),
        # A second attribute of the first shape, for a colour judge (data.roles: {colour: label}).
        "colour": list(COLOURS).index(scene[0].colour),
    }
    return {
        "__key__": f"{split}-{index:07d}",
        "png": png.getvalue(),
        "txt": caps[0].encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
        "wav": wav_bytes(render_audio(scene, spec), spec.sample_rate),
    }


def _spec_differences(stored: Any, spec: ShapesSpec) -> list[str]:
    """Human-readable differences between a stored spec (``sizes.json``) and ``spec``; [] if equal."""
    if not isinstance(stored, dict):
        return [f"no shapes spec stored (found {stored!r})"]
    if stored.get("content", 1) != CONTENT_VERSION:
        return [f"content (stored {stored.get('content', 1)!r}, requested {CONTENT_VERSION!r})"]
    try:
        if ShapesSpec.from_dict(stored) == spec:
            return []
    except (TypeError, ValueError) as error:
        return [f"stored spec is not valid ({error})"]
    wanted = spec.all_fields()
    normalised = ShapesSpec.from_dict(stored).all_fields()
    return [
        f"{k} (stored {normalised[k]!r}, requested {v!r})" for k, v in wanted.items() if normalised[k] != v
    ]


def _check_existing(out_dir: Path, spec: ShapesSpec) -> bool:
    return cached_dataset(out_dir, "shapes", lambda stored: _spec_differences(stored, spec))


def synth(out_dir: str | Path, spec: ShapesSpec, progress: bool = True) -> Path:
    """Generate the dataset of ``spec`` into ``out_dir`` (a cache: returns at once if already there).

    Layout: ``out_dir/<split>/shard-000000.tar ...`` plus ``out_dir/sizes.json``. Everything is
    written into a temporary sibling directory that is renamed into place at the end, so readers
    never see a partial dataset: an interrupted run leaves nothing at ``out_dir`` (its temporary
    directory is removed, except after SIGKILL), and when two processes race, the first rename
    wins and the second discards its copy (both copies are identical).
    """
    out_dir = Path(out_dir)
    if _check_existing(out_dir, spec):
        return out_dir

    def fill(tmp: Path) -> None:
        sizes = spec.split_sizes()
        with progress_counter(progress, "shapes", sum(sizes.values())) as advance:
            shard_sizes: dict[str, dict[str, int]] = {}
            for split, n in sizes.items():
                (tmp / split).mkdir()
                shard_sizes[split] = {}
                for start in range(0, n, spec.samples_per_shard):
                    indices = range(start, min(start + spec.samples_per_shard, n))
                    name = f"shard-{start // spec.samples_per_shard:06d}.tar"
                    samples = (make_sample(spec, split, i) for i in indices)
                    shard_sizes[split][name] = write_tar_shard(tmp / split / name, samples, on_sample=advance)
        write_sizes(tmp, {"spec": spec.to_dict(), "splits": shard_sizes, "modalities": list(MODALITIES)})

    if publish_dataset(out_dir, fill):
        _check_existing(out_dir, spec)  # another process won the race: it must have written the same spec
    return out_dir
