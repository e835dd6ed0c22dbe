"""Loader throughput on 64×64 JPEG shards, side by side in one run (one process = one core).

    python benchmarks/loader_throughput.py [--samples 4000] [--repeats 3]

Rows (samples/s, median of repeats, and the ratio to the bare PIL loop):
- tar → sample: xmodal's safe tar reader, raw bytes grouped per sample (no decode)
- tar → decoded sample: the same plus PIL decode to a uint8 tensor (xmodal's image decode)
- bare PIL loop: the same JPEG bytes already in memory, decoded with PIL (the per-core ceiling)
- folder → decoded sample: one file per sample read from disk and decoded (the usual ImageFolder way)
- stream → decoded batch, 1 worker: the training pipeline itself (ShardStream planning, shuffle
  buffer, decode_sample with caption choice, BatchCollate with tokenising, batches of 64) in one
  DataLoader worker process: samples/s per worker
Peak RSS of the process is printed at the end.
"""

from __future__ import annotations

import argparse
import io
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from xmodal.data.datamodule import BatchCollate, DecodeSpec, decode_image, decode_sample
from xmodal.data.shards import iter_tar_samples, write_tar_shard
from xmodal.data.stream import ShardInfo, ShardStream, StreamLoader, Topology
from xmodal.data.tokenizer import WordTokenizer


def make_jpegs(count: int, size: int = 64) -> list[bytes]:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        pixels = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)  # blocky, JPEG-like content
        image = Image.fromarray(pixels).resize((size, size), Image.NEAREST)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def timed(fn: Callable[[], int], repeats: int) -> float:
    """Median samples/s over repeats."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        count = fn()
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    jpegs = make_jpegs(args.samples)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = []
        for start in range(0, args.samples, args.per_shard):
            path = root / f"shard-{start // args.per_shard:06d}.tar"
            rows = [
                {"__key__": f"s{i:07d}", "jpg": jpegs[i], "txt": b"a caption"}
                for i in range(start, min(start + args.per_shard, args.samples))
            ]
            write_tar_shard(path, rows)
            shards.append(path)
        folder = root / "folder"
        folder.mkdir()
        for i, data in enumerate(jpegs):
            (folder / f"s{i:07d}.jpg").write_bytes(data)
        files = sorted(folder.iterdir())

        def tar_samples() -> int:
            return sum(1 for shard in shards for _ in iter_tar_samples(shard))

        def tar_decoded() -> int:
            return sum(
                decode_image(s["jpg"], 64).shape[0] > 0 for shard in shards for s in iter_tar_samples(shard)
            )

        def bare_pil() -> int:
            return sum(decode_image(data, 64).shape[0] > 0 for data in jpegs)

        def folder_decoded() -> int:
            return sum(decode_image(path.read_bytes(), 64).shape[0] > 0 for path in files)

        infos = [ShardInfo(str(p), len(range(0, args.per_shard))) for p in shards]
        infos[-1] = ShardInfo(str(shards[-1]), args.samples - args.per_shard * (len(shards) - 1))
        stream = ShardStream(
            infos,
            "exact",
            0,
            Topology(0, 1, 1),
            64,
            decode=partial(decode_sample, spec=DecodeSpec(required=("image", "text")), train=True),
            collate=BatchCollate(WordTokenizer.fit(["a caption"]), 16),
        )
        loader = StreamLoader(stream, persistent_workers=True)

        def stream_batches() -> int:
            return sum(int(batch["valid"].sum()) for batch in loader)

        stream_batches()  # start the persistent worker outside the timing

        rows = [
            ("tar → sample (no decode)", timed(tar_samples, args.repeats)),
            ("tar → decoded sample", timed(tar_decoded, args.repeats)),
            ("bare PIL loop (in memory)", timed(bare_pil, args.repeats)),
            ("folder → decoded sample", timed(folder_decoded, args.repeats)),
            ("stream → decoded batch, 1 worker", timed(stream_batches, args.repeats)),
        ]
    ceiling = rows[2][1]
    print(f"{args.samples} JPEG samples 64×64, {len(shards)} shards, median of {args.repeats}, 1 process")
    print(f"{'path':<34}{'samples/s':>12}{'vs bare PIL':>14}")
    for name, rate in rows:
        print(f"{name:<34}{rate:>12.0f}{rate / ceiling:>13.2f}×")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
