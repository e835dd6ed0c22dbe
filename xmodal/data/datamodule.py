"""The LightningDataModule: WebDataset tar shards streamed by ``xmodal.data.stream``.

Training uses ``data.mode`` (``exact``: every sample once per epoch across ranks × workers, short
slots padded with rows marked ``valid=False``; ``resampled``: a fixed number of samples per epoch
drawn with replacement). Validation and test are always ``exact``, so metrics over valid rows are
the same on any number of ranks. The train loader's position is saved in checkpoints and a resumed
fit continues with the remaining batches of the epoch.

Batch: ``image`` float ``[B, 3, H, W]`` in [-1, 1]; ``text`` long ``[B, T]`` and ``text_mask`` bool
``[B, T]``; ``label`` long ``[B]``; ``valid`` bool ``[B]``; ``captions`` (all references per row) and
``__key__`` as lists.
"""

from __future__ import annotations

import io
import json
import random
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image

from xmodal.data.shards import iter_tar_samples, split_shards
from xmodal.data.stream import ShardStream, StreamLoader, Topology, shards_from_dir
from xmodal.data.tokenizer import WordTokenizer

# The stream's __len__ is exact per rank whatever the worker count (each worker plays its own slot
# of the epoch plan), which Lightning cannot know when it warns about it.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


MAX_IMAGE_PIXELS = 50_000_000


def decode_image(data: bytes, image_size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """PNG/JPEG bytes → uint8 ``[3, H, W]`` (kept uint8 in memory: 4× smaller than float).

    The size in the header is checked before any pixel is decoded, so a decompression bomb costs
    nothing; too large or unreadable images raise (a counted skip in the stream).
    """
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        if width * height > max_pixels:
            raise ValueError(f"image of {width}×{height} pixels exceeds data.max_image_pixels={max_pixels}")
        img = img.convert("RGB")
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.BICUBIC)
        array = np.asarray(img, dtype=np.uint8)  # [H, W, 3]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # [3, H, W]


def sample_captions(sample: dict[str, Any]) -> list[str]:
    """All captions of a sample: the ``captions`` list of its JSON, else its ``.txt``."""
    if "json" in sample:
        meta = json.loads(sample["json"])
        if meta.get("captions"):
            return [str(c) for c in meta["captions"]]
    if "txt" in sample:
        return [sample["txt"].decode("utf-8").strip()]
    return []


def iter_split(shards_dir: Path, split: str) -> Iterator[dict[str, Any]]:
    for shard in split_shards(shards_dir, split):
        yield from iter_tar_samples(shard)


def decode_sample(
    raw: dict[str, Any], image_size: int, train: bool, max_pixels: int = MAX_IMAGE_PIXELS, seed: int = 0
) -> dict[str, Any]:
    """Raw tar record → decoded sample; raises (a counted skip) when a required modality is missing.

    Training draws one of the captions per epoch, seeded by (seed, epoch, key), so a resumed run
    sees the same captions as an uninterrupted one; evaluation keeps them all as references and
    uses the first as the target.
    """
    image = raw.get("png", raw.get("jpg", raw.get("jpeg")))
    if image is None:
        raise ValueError(f"sample {raw['__key__']!r} has no image")
    captions = sample_captions(raw)
    if not captions:
        raise ValueError(f"sample {raw['__key__']!r} has no caption")
    meta = json.loads(raw["json"]) if "json" in raw else {}
    return {
        "__key__": raw["__key__"],
        "image": decode_image(image, image_size, max_pixels),
        "captions": captions,
        "caption": random.Random(f"{seed}:{raw.get('__epoch__', 0)}:{raw['__key__']}").choice(captions)
        if train
        else captions[0],
        "label": int(meta.get("label", -1)),
    }


class CaptionCollate:
    """Rows → batch (tokenising the target captions). A plain object so spawned workers can pickle it."""

    def __init__(self, tokenizer: WordTokenizer, max_text_len: int):
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        text, text_mask = self.tokenizer.encode_batch([r["caption"] for r in rows], self.max_text_len)
        return {
            "image": torch.stack([r["image"] for r in rows]).float() / 127.5 - 1.0,  # [B, 3, H, W]
            "text": text,  # [B, T]
            "text_mask": text_mask,  # [B, T]
            "label": torch.tensor([r["label"] for r in rows], dtype=torch.long),  # [B]
            "valid": torch.tensor([r.get("valid", True) for r in rows], dtype=torch.bool),  # [B]
            "captions": [r["captions"] for r in rows],
            "__key__": [r["__key__"] for r in rows],
        }


class ShardDataModule(L.LightningDataModule):
    def __init__(
        self,
        shards_dir: Path,
        batch_size: int,
        num_workers: int,
        image_size: int,
        max_text_len: int,
        min_word_count: int = 1,
        tokenizer: WordTokenizer | None = None,
        seed: int = 0,
        mode: str = "exact",
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        max_consecutive_failures: int = 100,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ):
        super().__init__()
        self.shards_dir = Path(shards_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.max_text_len = max_text_len
        self.min_word_count = min_word_count
        self.tokenizer = tokenizer
        self.seed = seed
        self.mode = mode
        self.samples_per_epoch = samples_per_epoch
        self.shuffle_buffer = shuffle_buffer
        self.max_consecutive_failures = max_consecutive_failures
        self.max_image_pixels = max_image_pixels
        self.streams: dict[str, ShardStream] = {}

    def build_tokenizer(self) -> WordTokenizer:
        """Fit the word vocabulary on the training captions only (no val/test leakage)."""
        captions = (c for sample in iter_split(self.shards_dir, "train") for c in sample_captions(sample))
        self.tokenizer = WordTokenizer.fit(captions, self.min_word_count)
        return self.tokenizer

    def setup(self, stage: str) -> None:
        if self.tokenizer is None:
            self.build_tokenizer()

    def topology(self) -> Topology:
        """This rank's place in data parallelism, from the Trainer's strategy (1 rank outside one)."""
        kwargs = getattr(self.trainer, "distributed_sampler_kwargs", None) if self.trainer else None
        rank, world = (kwargs["rank"], kwargs["num_replicas"]) if kwargs else (0, 1)
        return Topology(rank, world, self.num_workers)

    def loader(self, split: str, topology: Topology) -> StreamLoader:
        """The loader of one split for one rank; training follows ``mode``, evaluation is exact."""
        assert self.tokenizer is not None, "setup() builds the tokenizer first"
        train = split == "train"
        shards = shards_from_dir(self.shards_dir, split)
        if not shards:
            raise ValueError(f"split {split!r} of {self.shards_dir} lists no shards in its sizes.json")
        stream = ShardStream(
            shards,
            self.mode if train else "exact",
            self.seed,
            topology,
            self.batch_size,
            decode=partial(
                decode_sample,
                image_size=self.image_size,
                train=train,
                max_pixels=self.max_image_pixels,
                seed=self.seed,
            ),
            collate=CaptionCollate(self.tokenizer, self.max_text_len),
            samples_per_epoch=self.samples_per_epoch if train else None,
            # Evaluation order does not matter, and tar order reads each shard once, sequentially.
            shuffle_buffer=self.shuffle_buffer if train else 1,
            max_consecutive_failures=self.max_consecutive_failures,
        )
        self.streams[split] = stream
        return StreamLoader(stream, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> StreamLoader:
        return self.loader("train", self.topology())

    def val_dataloader(self) -> StreamLoader:
        return self.loader("val", self.topology())

    def test_dataloader(self) -> StreamLoader:
        return self.loader("test", self.topology())

    def skipped(self) -> dict[str, dict[str, int]]:
        """Samples skipped as unreadable so far, per split and shard (nothing is dropped silently)."""
        return self._per_split(ShardStream.skip_counts)

    def errors(self) -> dict[str, dict[str, int]]:
        """Failure events (undecodable samples, unreadable shards) so far, per split and shard."""
        return self._per_split(ShardStream.error_counts)

    def _per_split(self, counter: Callable[[ShardStream], dict[str, int]]) -> dict[str, dict[str, int]]:
        return {split: counts for split, stream in self.streams.items() if (counts := counter(stream))}

    def sample_batch(self, n: int, split: str = "val") -> dict[str, Any]:
        """The first ``n`` decodable samples of a split as one batch: a fixed set for sample grids."""
        assert self.tokenizer is not None
        rows = []
        for raw in iter_split(self.shards_dir, split):
            try:
                rows.append(decode_sample(raw, self.image_size, train=False))
            except ValueError:
                continue
            if len(rows) == n:
                break
        return CaptionCollate(self.tokenizer, self.max_text_len)(rows)
