"""Loader throughput on 64×64 JPEG shards, side by side in one run (one process = one core).

    python benchmarks/loader_throughput.py [--samples 4000] [--repeats 3] [--tokenizers word,subword]
    python benchmarks/loader_throughput.py --source-size 256 --image-size 64   # users' photos

``--source-size`` sets the stored JPEGs' side, ``--image-size`` the experiment's (``data.image_size``).
When they differ, the bare PIL row also resizes (what a plain loader must do), and one more row
decodes at full size before resizing (xmodal without libjpeg's DCT scaling), to show that gain.

Rows (samples/s, median of repeats, and the ratio to the bare PIL loop):
- tar → sample: xmodal's safe tar reader, raw bytes grouped per sample (no decode)
- tar → decoded sample: the same plus xmodal's image decode to a uint8 tensor (libjpeg-turbo
  through simplejpeg, see xmodal/codecs/pixels.py)
- tar → decoded batch: the same, stacked into uint8 batches of 64 (what loaders hand over)
- bare PIL loop: the same JPEG bytes already in memory, ``np.asarray(Image.open(...).convert("RGB"))``
  (the issue's per-core ceiling; every ratio is to this row)
- bare libjpeg-turbo loop: the same bytes through ``simplejpeg.decode_jpeg`` alone — the ceiling for
  xmodal's own decoder, so "tar → decoded sample" over this row is what the pipeline keeps of it
- folder → decoded sample: one file per sample read from disk and decoded (the usual ImageFolder way)
- stream → decoded batch, 1 worker: the training pipeline itself (ShardStream planning, shuffle
  buffer, decode_sample with caption choice, BatchCollate with tokenising, batches of 64) in one
  DataLoader worker process: samples/s per worker; and the same in the benchmark's own process
  (no worker, no hand-over), which separates the pipeline's cost from the process boundary's
Peak RSS of the process is printed at the end.

``--tokenizers word,subword`` (any of ``word``, ``subword``, ``subword-unigram``): every sample gets its
own caption (shapes-style English, 3–5 words per shape, drawn at random) and the two stream rows are
run once per tokenizer, fitted on those captions: "in process, cold" builds a fresh tokenizer (empty
memo) each round, as the first epoch sees it; "1 worker" keeps its worker, so after the first round
the memo answers, as in later epochs.
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
import simplejpeg
import torch
from PIL import Image

from xmodal.codecs.pixels import _fit, decode_image
from xmodal.data.datamodule import BatchCollate, DecodeSpec, decode_sample
from xmodal.data.epoch_plan import ShardInfo, Topology
from xmodal.data.loader import StreamLoader
from xmodal.data.shapes import COLOURS, KINDS, POSITION_PHRASES, SIZES
from xmodal.data.shards import iter_tar_samples, write_tar_shard
from xmodal.data.stream import ShardStream
from xmodal.data.tokenizer import WordTokenizer
from xmodal.tokenizers.build import fit_tokenizer, tokenizer_from_state

TOKENIZERS = {
    "word": {"_target_": "xmodal.tokenizers.word.WordTokenizer"},
    "subword": {"_target_": "xmodal.tokenizers.subword.SubwordTokenizer", "vocab_size": 1000},
    "subword-unigram": {
        "_target_": "xmodal.tokenizers.subword.SubwordTokenizer",
        "algorithm": "unigram",
        "vocab_size": 1000,
    },
}


def make_captions(count: int) -> list[str]:
    """One shapes-style caption per sample, most of them distinct (1–2 shapes, random attributes)."""
    rng = np.random.default_rng(1)
    colours, phrases = list(COLOURS), list(POSITION_PHRASES.values())
    out = []
    for _ in range(count):
        shapes = [
            f"a {rng.choice(SIZES)} {rng.choice(colours)} {rng.choice(KINDS)} {rng.choice(phrases)}"
            for _ in range(int(rng.integers(1, 3)))
        ]
        out.append(" and ".join(shapes))
    return out


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


def timed(paths: list[tuple[str, Callable[[], int]]], repeats: int) -> list[tuple[str, float]]:
    """Median samples/s of each path over ``repeats`` rounds; each round runs every path once, so
    a change of machine load during the run touches all rows alike."""
    rates: dict[str, list[float]] = {name: [] for name, _ in paths}
    for _ in range(repeats):
        for name, fn in paths:
            start = time.perf_counter()
            count = fn()
            rates[name].append(count / (time.perf_counter() - start))
    return [(name, statistics.median(rates[name])) for name, _ in paths]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--source-size", type=int, default=64, help="side of the stored JPEGs")
    parser.add_argument("--image-size", type=int, default=64, help="side the loader fits them to")
    parser.add_argument("--tokenizers", default="", help="comma list of word, subword, subword-unigram")
    args = parser.parse_args()
    size, fitted = args.source_size, args.image_size
    tokenizers = [t for t in args.tokenizers.split(",") if t]
    unknown = [t for t in tokenizers if t not in TOKENIZERS]
    if unknown:
        parser.error(f"--tokenizers: unknown {unknown}; known: {list(TOKENIZERS)}")
    captions = make_captions(args.samples) if tokenizers else ["a caption"] * args.samples
    # One process = one core, as in a DataLoader worker (which runs torch with one thread too).
    torch.set_num_threads(1)

    jpegs = make_jpegs(args.samples, size)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = []
        for start in range(0, args.samples, args.per_shard):
            path = root / f"shard-{start // args.per_shard:06d}.tar"
            rows = [
                {"__key__": f"s{i:07d}", "jpg": jpegs[i], "txt": captions[i].encode()}
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
                decode_image(s["jpg"], fitted).shape[0] > 0
                for shard in shards
                for s in iter_tar_samples(shard)
            )

        def tar_decoded_batches() -> int:
            count, images = 0, []
            for shard in shards:
                for sample in iter_tar_samples(shard):
                    images.append(decode_image(sample["jpg"], fitted))
                    if len(images) == 64:
                        count += len(torch.stack(images))  # [64, 3, 64, 64] uint8
                        images = []
            return count + (len(torch.stack(images)) if images else 0)

        def bare_pil() -> int:
            if size == fitted:
                return sum(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).size > 0 for data in jpegs)
            return sum(
                np.asarray(
                    Image.open(io.BytesIO(data)).convert("RGB").resize((fitted, fitted), Image.BICUBIC)
                ).size
                > 0
                for data in jpegs
            )

        def full_size_then_resize() -> int:
            def one(data: bytes) -> bool:
                img = Image.fromarray(simplejpeg.decode_jpeg(data, strict=True))
                return np.asarray(_fit(img, fitted, "resize", None)).size > 0

            return sum(one(s["jpg"]) for shard in shards for s in iter_tar_samples(shard))

        def bare_turbo() -> int:
            return sum(simplejpeg.decode_jpeg(data).size > 0 for data in jpegs)

        def folder_decoded() -> int:
            return sum(decode_image(path.read_bytes(), fitted).shape[0] > 0 for path in files)

        infos = [ShardInfo(str(p), len(range(0, args.per_shard))) for p in shards]
        infos[-1] = ShardInfo(str(shards[-1]), args.samples - args.per_shard * (len(shards) - 1))

        def training_stream(workers: int, tokenizer: object) -> ShardStream:
            return ShardStream(
                infos,
                "exact",
                0,
                Topology(0, 1, workers),
                64,
                decode=partial(
                    decode_sample, spec=DecodeSpec(required=("image", "text"), image_size=fitted), train=True
                ),
                collate=BatchCollate(tokenizer, 16),
            )

        def stream_paths(name: str, tokenizer: object, cold: bool) -> list[tuple[str, Callable[[], int]]]:
            loader = StreamLoader(training_stream(1, tokenizer), persistent_workers=True)
            in_process = training_stream(0, tokenizer)

            def stream_batches() -> int:
                return sum(int(batch["valid"].sum()) for batch in loader)

            def stream_in_process() -> int:
                # cold: a fresh tokenizer (empty memo) per round, as in a first epoch
                stream = training_stream(0, tokenizer_from_state(tokenizer.state())) if cold else in_process
                return sum(int(batch["valid"].sum()) for batch in stream.iter_worker(0))

            stream_batches()  # start the persistent worker outside the timing
            suffix = f", {name}" if name else ""
            return [
                (f"stream → decoded batch, in process{', cold' if cold else ''}{suffix}", stream_in_process),
                (f"stream → decoded batch, 1 worker{suffix}", stream_batches),
            ]

        if tokenizers:
            streams = []
            for name in tokenizers:
                streams += stream_paths(name, fit_tokenizer(TOKENIZERS[name], iter(captions), 16), cold=True)
        else:
            streams = stream_paths("", WordTokenizer.fit(["a caption"]), cold=False)

        extra = [] if size == fitted else [("tar → full-size decode, then resize", full_size_then_resize)]
        rows = timed(
            [
                ("tar → sample (no decode)", tar_samples),
                ("tar → decoded sample", tar_decoded),
                ("tar → decoded batch", tar_decoded_batches),
                ("bare PIL loop (in memory)" + (" + resize" if size != fitted else ""), bare_pil),
                ("bare libjpeg-turbo loop (in memory)", bare_turbo),
                ("folder → decoded sample", folder_decoded),
                *streams,
                *extra,
            ],
            args.repeats,
        )
    ceiling = rows[3][1]
    turbo = rows[4][1]
    print(
        f"{args.samples} JPEG samples {size}×{size} fitted to {fitted}×{fitted}, {len(shards)} shards, "
        f"median of {args.repeats} interleaved rounds, 1 process"
    )
    width = max(38, *(len(name) + 2 for name, _ in rows))
    print(f"{'path':<{width}}{'samples/s':>12}{'vs bare PIL':>14}{'vs bare turbo':>16}")
    for name, rate in rows:
        print(f"{name:<{width}}{rate:>12.0f}{rate / ceiling:>13.2f}×{rate / turbo:>15.2f}×")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
