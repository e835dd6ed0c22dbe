"""xmodal-sensor-synth --out DIR --n N: a captioned sensor dataset, written with webdataset's TarWriter.

Each sample is ``key.npy`` (one channel, 64 steps: a sine, square or sawtooth wave, slow or fast,
small or large, with noise and a random phase) and ``key.txt`` ("a fast square wave with large
swings"); splits train/val/test = 80/10/10 % and a ``sizes.json`` index.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np

KINDS = ("sine", "square", "sawtooth")
SPEEDS = {"slow": 2.0, "fast": 6.0}
SIZES = {"small": 0.3, "large": 1.0}
LENGTH = 64


def make_series(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    kind, speed, size = rng.choice(KINDS), rng.choice(list(SPEEDS)), rng.choice(list(SIZES))
    t = np.arange(LENGTH) / LENGTH * SPEEDS[speed] + rng.uniform(0, 1)
    phase = 2 * np.pi * t
    wave = {"sine": np.sin(phase), "square": np.sign(np.sin(phase)), "sawtooth": 2 * (t % 1.0) - 1}[kind]
    series = SIZES[size] * wave + rng.normal(0, 0.05, LENGTH)
    return series[None].astype(np.float32), f"a {speed} {kind} wave with {size} swings"


def write(out: Path, n: int, seed: int = 0) -> Path:
    from webdataset import TarWriter

    rng = np.random.default_rng(seed)
    counts = {"train": n * 8 // 10, "val": n // 10, "test": n - n * 8 // 10 - n // 10}
    splits = {}
    for split, count in counts.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        with TarWriter(str(out / split / "shard-000000.tar")) as sink:
            for i in range(count):
                series, caption = make_series(rng)
                buffer = io.BytesIO()
                np.save(buffer, series, allow_pickle=False)
                sink.write({"__key__": f"{split}{i:06d}", "npy": buffer.getvalue(), "txt": caption})
        splits[split] = {"shard-000000.tar": count}
    (out / "sizes.json").write_text(
        json.dumps({"splits": splits, "modalities": ["sensor", "text"]}, indent=1)
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xmodal-sensor-synth", description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write(args.out, args.n, args.seed))
    return 0
