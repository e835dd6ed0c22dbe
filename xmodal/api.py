"""A Python API over trained checkpoints: the same code path as ``xmodal-generate``.

    import xmodal
    model = xmodal.load("outputs/shapes_caption/<run>/checkpoints/best.ckpt")
    model.caption(["a.png", "b.png"])                  # -> ["a large red circle ...", ...]
    model.generate(caption=["a small blue square"], num=4, out="samples")   # -> rows with PNG paths

``generate`` takes one keyword per registered modality (``image=``, ``audio=``, ``caption=``,
``label=``; a plug-in modality adds its own), exactly the values the CLI flags take, and returns the
rows the CLI prints (``--json``).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from xmodal.registry import MODALITIES


class Model:
    """A trained task loaded from one checkpoint, in eval mode on ``device``."""

    def __init__(self, task: Any, ckpt: Path):
        self.task = task
        self.ckpt = ckpt

    def generate(
        self, num: int = 4, seed: int = 0, out: str | Path = "generated", **inputs: Iterable[Any]
    ) -> list[dict[str, Any]]:
        """Outputs for ``inputs`` (modality name or flag → values); as ``xmodal-generate --json``."""
        if num < 1:
            raise ValueError("num must be >= 1")
        flags = {(cls.input_flag or name): name for name, cls in MODALITIES.items()}
        given: dict[str, list[Any]] = {}
        for key, values in inputs.items():
            name = flags.get(key, key)
            if name not in MODALITIES:
                raise ValueError(f"unknown input {key!r} (inputs: {', '.join(sorted(flags))})")
            given[name] = [values] if isinstance(values, (str, Path, int)) else list(values)
        args = argparse.Namespace(ckpt=self.ckpt, num=num, seed=seed, out=Path(out), json=True, csv=False)
        return self.task.generate_outputs(given, args)

    def caption(self, files: str | Path | Iterable[str | Path]) -> list[str]:
        """One caption per file (images, audio clips: whatever the captioner reads)."""
        paths = [Path(files)] if isinstance(files, (str, Path)) else [Path(f) for f in files]
        by_modality: dict[str, list[Path]] = {}
        for path in paths:
            by_modality.setdefault(modality_of_file(path), []).append(path)
        if len(by_modality) > 1:
            raise ValueError(
                f"files of several modalities given ({', '.join(sorted(by_modality))}): one at a time"
            )
        rows = self.generate(**{name: [str(p) for p in found] for name, found in by_modality.items()})
        return [row["caption"] for row in rows]


def modality_of_file(path: Path) -> str:
    """The registered modality that reads files with this suffix (its member extensions)."""
    ext = path.suffix.lstrip(".").lower()
    for name, cls in MODALITIES.items():
        if cls.input_files and ext in cls.extensions:
            return name
    raise ValueError(f"{path}: no modality reads .{ext} files")


def load(ckpt: str | Path, device: str = "cpu") -> Model:
    """The task of a checkpoint written by ``xmodal-train`` (any family), ready to generate."""
    from xmodal.config import ConfigError
    from xmodal.evaluate import load_task

    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        task = load_task(path)
    except ConfigError as err:
        raise ValueError(str(err).replace("invalid config:\n  ", "")) from None
    return Model(task.to(device).eval(), path)
