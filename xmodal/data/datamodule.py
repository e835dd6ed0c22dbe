"""A simple in-memory LightningDataModule over WebDataset tar shards.

Foundation version: each split is read once into memory (shapes data is small) and served by
map-style datasets. Evaluation is exact-once across ranks: each rank takes every world-th
sample and short ranks are padded with rows marked ``valid=False`` (Lightning's
DistributedSampler would repeat real samples instead, so 2 ranks would score differently from
1). The data-layer issue replaces this with the streaming contract (exact-once epochs, resume,
resampling) while keeping the batch format below.

Batch: ``image`` float ``[B, 3, H, W]`` in [-1, 1]; ``text`` long ``[B, T]`` and ``text_mask`` bool
``[B, T]``; ``label`` long ``[B]``; ``valid`` bool ``[B]``; ``captions`` (all references per row) and
``__key__`` as lists.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from xmodal.data.shards import iter_tar_samples, split_shards
from xmodal.data.tokenizer import WordTokenizer


def decode_image(data: bytes, image_size: int) -> torch.Tensor:
    """PNG/JPEG bytes → uint8 ``[3, H, W]`` (kept uint8 in memory: 4× smaller than float)."""
    with Image.open(io.BytesIO(data)) as img:
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


PADDING = -1
"""Sampler index of a padding row: a copy of sample 0 marked ``valid=False``."""


class EvenEvalSampler(Sampler[int]):
    """This rank's share of an evaluation split, every sample exactly once over all ranks.

    Rank r takes indices r, r + world, ...; ranks left one short get a PADDING index, so every
    rank runs the same number of batches (no collective waits on a rank that has finished).
    """

    def __init__(self, size: int, rank: int, world: int):
        self.indices = list(range(rank, size, world))
        self.indices += [PADDING] * (-(-size // world) - len(self.indices))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class CaptionDataset(Dataset):
    """Decoded samples of one split; ``train=True`` draws one caption per access (fresh each epoch)."""

    def __init__(self, samples: list[dict[str, Any]], train: bool):
        self.samples = samples
        self.train = train

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[max(index, 0)]
        captions = sample["captions"]
        caption = random.choice(captions) if self.train else captions[0]
        return {**sample, "caption": caption, "valid": index != PADDING}


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
    ):
        super().__init__()
        self.seed = seed
        self.shards_dir = Path(shards_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.max_text_len = max_text_len
        self.min_word_count = min_word_count
        self.tokenizer = tokenizer
        self.datasets: dict[str, CaptionDataset] = {}
        self.skipped: dict[str, int] = {}

    def build_tokenizer(self) -> WordTokenizer:
        """Fit the word vocabulary on the training captions only (no val/test leakage)."""
        captions = (c for sample in iter_split(self.shards_dir, "train") for c in sample_captions(sample))
        self.tokenizer = WordTokenizer.fit(captions, self.min_word_count)
        return self.tokenizer

    def load_split(self, split: str) -> CaptionDataset:
        if split not in self.datasets:
            samples, skipped = [], 0
            for raw in iter_split(self.shards_dir, split):
                captions = sample_captions(raw)
                image = raw.get("png", raw.get("jpg", raw.get("jpeg")))
                if image is None or not captions:
                    skipped += 1  # a required modality is missing: counted, reported in the log
                    continue
                meta = json.loads(raw["json"]) if "json" in raw else {}
                samples.append(
                    {
                        "__key__": raw["__key__"],
                        "image": decode_image(image, self.image_size),
                        "captions": captions,
                        "label": int(meta.get("label", -1)),
                    }
                )
            if not samples:
                raise ValueError(f"split {split!r} of {self.shards_dir} has no usable image+caption sample")
            self.skipped[split] = skipped
            self.datasets[split] = CaptionDataset(samples, train=split == "train")
        return self.datasets[split]

    def setup(self, stage: str) -> None:
        if self.tokenizer is None:
            self.build_tokenizer()
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in splits[stage]:
            self.load_split(split)

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        assert self.tokenizer is not None
        text, text_mask = self.tokenizer.encode_batch([r["caption"] for r in rows], self.max_text_len)
        return {
            "image": torch.stack([r["image"] for r in rows]).float() / 127.5 - 1.0,  # [B, 3, H, W]
            "text": text,  # [B, T]
            "text_mask": text_mask,  # [B, T]
            "label": torch.tensor([r["label"] for r in rows], dtype=torch.long),  # [B]
            "valid": torch.tensor([r["valid"] for r in rows], dtype=torch.bool),  # [B]
            "captions": [r["captions"] for r in rows],
            "__key__": [r["__key__"] for r in rows],
        }

    def _topology(self) -> tuple[int, int]:
        """(rank, world) of data parallelism; (0, 1) outside a Trainer or on one device."""
        kwargs = getattr(self.trainer, "distributed_sampler_kwargs", None) if self.trainer else None
        return (kwargs["rank"], kwargs["num_replicas"]) if kwargs else (0, 1)

    def _loader(self, split: str, train: bool) -> DataLoader:
        # The Trainer runs with use_distributed_sampler=False: the samplers below are the split.
        dataset = self.load_split(split)
        rank, world = self._topology()
        if train:
            # Equal batch counts per rank by dropping the tail; reshuffled per epoch (Lightning
            # calls set_epoch) with the same seed on every rank.
            sampler: Sampler[int] = DistributedSampler(
                dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed, drop_last=True
            )
        else:
            sampler = EvenEvalSampler(len(dataset), rank, world)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=train,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def sample_batch(self, n: int, split: str = "val") -> dict[str, Any]:
        """The first ``n`` samples of a split as one batch: a fixed set for sample grids."""
        dataset = self.load_split(split)
        return self.collate([dataset[i] for i in range(min(n, len(dataset)))])
