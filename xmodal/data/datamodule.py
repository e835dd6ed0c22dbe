"""The LightningDataModule: WebDataset tar shards streamed by ``xmodal.data.stream``.

Training uses ``data.mode`` (``exact``: every sample once per epoch across ranks × workers, short
slots padded with rows marked ``valid=False``; ``resampled``: a fixed number of samples per epoch
drawn with replacement). Validation and test are always ``exact``, so metrics over valid rows are
the same on any number of ranks. The train loader's position is saved in checkpoints and a resumed
fit continues with the remaining batches of the epoch.

Batch (see :class:`BatchCollate`): ``image`` float ``[B, C, H, W]`` in [-1, 1] and ``audio``
log-mel ``[B, 1, M, T]`` + ``audio_mask`` when the task needs them; ``text`` long ``[B, T]`` and
``text_mask`` bool ``[B, T]``; ``label`` long ``[B]``; ``valid`` bool ``[B]``; ``captions`` (all
references per row) and ``__key__`` as lists.
"""

from __future__ import annotations

import json
import math
import random
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch

from xmodal.data.audio import LOG_FLOOR, decode_audio
from xmodal.data.pixels import MAX_IMAGE_PIXELS, decode_image
from xmodal.data.shards import ShardError, iter_shard, split_shards
from xmodal.data.stream import ShardStream, StreamLoader, Topology, shards_from_dir
from xmodal.data.tokenizer import WordTokenizer

# The stream's __len__ is exact per rank whatever the worker count (each worker plays its own slot
# of the epoch plan), which Lightning cannot know when it warns about it.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


AUDIO_EXTENSIONS = ("wav", "flac")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")


@dataclass(frozen=True)
class DecodeSpec:
    """How raw records become tensors, and which modalities a sample must have to be kept.

    ``required`` comes from the task (a captioner needs its source and ``text``; a text→image
    GAN needs ``image`` and ``text``): a sample missing one is skipped and counted, never
    silently padded. ``optional`` modalities are decoded when present and masked when absent
    (zeros plus ``<modality>_present`` False in the batch). Other modalities are not decoded (no
    cost), except captions and labels, which are cheap and feed tables and conditional metrics.
    """

    image_size: int = 64
    image_channels: int = 3
    audio_mels: int = 64
    audio_frames: int = 64
    required: tuple[str, ...] = ("image", "text")
    optional: tuple[str, ...] = ()
    max_pixels: int = MAX_IMAGE_PIXELS
    seed: int = 0
    image_fit: str = "resize"
    """resize (stretch to a square) | center_crop (short side to size, centre cut) | random_crop
    (short side to 9/8 × size, a random cut per epoch in training, the centre in evaluation)."""


def sample_captions(sample: dict[str, Any], meta: dict[str, Any] | None = None) -> list[str]:
    """All captions of a sample: the ``captions`` list of its JSON (``meta``: already parsed), else
    its ``.txt``."""
    if meta is None and "json" in sample:
        meta = json.loads(sample["json"])
    if meta and meta.get("captions"):
        return [str(c) for c in meta["captions"]]
    if "txt" in sample:
        return [sample["txt"].decode("utf-8").strip()]
    return []


def sample_label(raw: dict[str, Any], meta: dict[str, Any]) -> int | None:
    """The integer label of a sample: its ``.cls`` member, else ``label`` in its JSON."""
    if "cls" in raw:
        try:
            return int(raw["cls"].decode("utf-8").strip())
        except ValueError as err:
            raise ValueError(f"sample {raw['__key__']!r}: .cls is not an integer") from err
    label = meta.get("label")
    return None if label is None else int(label)


def iter_split(shards_dir: Path, split: str, allow_pipe: bool = False) -> Iterator[dict[str, Any]]:
    for shard in split_shards(shards_dir, split):
        yield from iter_shard(shard, allow_pipe)


def _first(raw: dict[str, Any], extensions: tuple[str, ...]) -> tuple[str, bytes] | None:
    return next(((ext, raw[ext]) for ext in extensions if ext in raw), None)


def _sample_hash(purpose: str, seed: int, epoch: int, key: str) -> int:
    """A per-sample integer that is a pure function of (purpose, seed, epoch, key), in any process."""
    return zlib.crc32(f"{purpose}:{seed}:{epoch}:{key}".encode())


def _sample_rng(purpose: str, seed: int, epoch: int, key: str) -> random.Random:
    """A generator seeded by :func:`_sample_hash`.

    Seeded with an integer: seeding ``random.Random`` with a string runs SHA-512 (~10 µs, as much
    as reading the sample from its tar)."""
    return random.Random(_sample_hash(purpose, seed, epoch, key))


def _wanted(spec: DecodeSpec, modality: str, present: bool, key: str, out: dict[str, Any]) -> bool:
    """Whether to decode ``modality``; raises for a missing required one, marks an optional one."""
    if modality in spec.required:
        if not present:
            raise ValueError(f"sample {key!r} has no {'caption' if modality == 'text' else modality}")
        return True
    if modality in spec.optional:
        out[f"{modality}_present"] = present
        return True
    return False


def decode_sample(raw: dict[str, Any], spec: DecodeSpec, train: bool) -> dict[str, Any]:
    """Raw tar record → decoded sample; raises (a counted skip) when a required modality is missing.

    Training draws one of the captions per epoch, seeded by (seed, epoch, key), so a resumed run
    sees the same captions as an uninterrupted one; evaluation keeps them all as references and
    uses the first as the target.
    """
    key = raw["__key__"]
    out: dict[str, Any] = {"__key__": key}
    image = _first(raw, IMAGE_EXTENSIONS)
    if _wanted(spec, "image", image is not None, key, out):
        if image is None:
            out["image"] = torch.zeros(
                spec.image_channels, spec.image_size, spec.image_size, dtype=torch.uint8
            )
        else:
            # A training crop moves with the epoch but is the same on a resumed run (seeded like captions).
            crop_rng = (
                _sample_rng("crop", spec.seed, raw.get("__epoch__", 0), key)
                if train and spec.image_fit == "random_crop"
                else None
            )
            out["image"] = decode_image(
                image[1], spec.image_size, spec.max_pixels, spec.image_channels, spec.image_fit, crop_rng
            )
    audio = _first(raw, AUDIO_EXTENSIONS)
    if _wanted(spec, "audio", audio is not None, key, out):
        if audio is None:
            out["audio"] = torch.full((1, spec.audio_mels, spec.audio_frames), math.log(LOG_FLOOR))
            out["audio_mask"] = torch.zeros(spec.audio_frames, dtype=torch.bool)
        else:
            out["audio"], out["audio_mask"] = decode_audio(
                audio[1], audio[0], spec.audio_mels, spec.audio_frames
            )
    meta = json.loads(raw["json"]) if "json" in raw else {}
    captions = sample_captions(raw, meta)
    _wanted(spec, "text", bool(captions), key, out)
    label = sample_label(raw, meta)
    if "label" in spec.required and label is None:
        raise ValueError(f"sample {key!r} has no label (.cls member or 'label' in its JSON)")
    out["captions"] = captions
    if not captions:
        out["caption"] = ""
    elif train and len(captions) > 1:
        # A hash, not a seeded Random: 0.2 µs instead of 5 µs per sample, and as reproducible.
        pick = _sample_hash("caption", spec.seed, raw.get("__epoch__", 0), key) % len(captions)
        out["caption"] = captions[pick]
    else:
        out["caption"] = captions[0]
    out["label"] = -1 if label is None else label
    return out


def images_to_float(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with a uint8 ``image`` ``[B, C, H, W]`` (as collated) as float in [-1, 1].

    The tasks call this once the batch is on its device (``on_after_batch_transfer``), so the
    conversion runs on the accelerator and loader workers only ever move uint8. Float images pass
    through unchanged.
    """
    image = batch.get("image")
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8:
        batch["image"] = image.float().mul_(1 / 127.5).sub_(1.0)  # [B, C, H, W] in [-1, 1]
    return batch


class BatchCollate:
    """Rows → batch (tokenising the target captions). A plain object so spawned workers can pickle it.

    Keys: ``image`` uint8 ``[B, C, H, W]`` (``images_to_float`` makes it float in [-1, 1]) and ``audio`` ``[B, 1, M, T]`` +
    ``audio_mask`` ``[B, T]`` when required or optional (then with ``image_present`` /
    ``audio_present`` / ``text_present`` bool ``[B]``); always ``text`` ``[B, T]`` + ``text_mask``,
    ``label`` ``[B]`` (-1 = none), ``valid`` ``[B]``, ``captions`` and ``__key__`` lists.
    """

    def __init__(self, tokenizer: WordTokenizer, max_text_len: int):
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        text, text_mask = self.tokenizer.encode_batch([r["caption"] for r in rows], self.max_text_len)
        batch: dict[str, Any] = {
            "text": text,  # [B, T]
            "text_mask": text_mask,  # [B, T]
            "label": torch.tensor([r["label"] for r in rows], dtype=torch.long),  # [B]
            "valid": torch.tensor([r.get("valid", True) for r in rows], dtype=torch.bool),  # [B]
            "captions": [r["captions"] for r in rows],
            "__key__": [r["__key__"] for r in rows],
        }
        if "image" in rows[0]:
            # uint8 until it is on the device (images_to_float): a quarter of the bytes to hand from
            # worker to main process, and no float pass in the worker (it was half the collate time).
            batch["image"] = torch.stack([r["image"] for r in rows])  # [B, C, H, W] uint8
        if "audio" in rows[0]:
            batch["audio"] = torch.stack([r["audio"] for r in rows])  # [B, 1, M, T]
            batch["audio_mask"] = torch.stack([r["audio_mask"] for r in rows])  # [B, T]
        for key in (k for k in rows[0] if k.endswith("_present")):  # optional modalities
            batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.bool)  # [B]
        return batch


class ShardDataModule(L.LightningDataModule):
    def __init__(
        self,
        shards_dir: Path,
        batch_size: int,
        num_workers: int,
        decode: DecodeSpec,
        max_text_len: int,
        min_word_count: int = 1,
        tokenizer: WordTokenizer | None = None,
        seed: int = 0,
        mode: str = "exact",
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        max_consecutive_failures: int = 100,
        allow_pipe: bool = False,
    ):
        super().__init__()
        self.allow_pipe = allow_pipe
        self.shards_dir = Path(shards_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.decode = decode
        self.max_text_len = max_text_len
        self.min_word_count = min_word_count
        self.tokenizer = tokenizer
        self.seed = seed
        self.mode = mode
        self.samples_per_epoch = samples_per_epoch
        self.shuffle_buffer = shuffle_buffer
        self.max_consecutive_failures = max_consecutive_failures
        self.streams: dict[str, ShardStream] = {}

    def build_tokenizer(self) -> WordTokenizer:
        """Fit the word vocabulary on the training captions only (no val/test leakage)."""
        samples = iter_split(self.shards_dir, "train", self.allow_pipe)
        captions = (c for sample in samples for c in sample_captions(sample))
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
            decode=partial(decode_sample, spec=self.decode, train=train),
            collate=BatchCollate(self.tokenizer, self.max_text_len),
            samples_per_epoch=self.samples_per_epoch if train else None,
            # Evaluation order does not matter, and tar order reads each shard once, sequentially.
            shuffle_buffer=self.shuffle_buffer if train else 1,
            max_consecutive_failures=self.max_consecutive_failures,
            allow_pipe=self.allow_pipe,
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
        """The first ``n`` decodable samples of a split as one batch: a fixed set for sample grids.

        Bad samples and unreadable shards are passed over here (the stream counts them)."""
        assert self.tokenizer is not None
        rows: list[dict[str, Any]] = []
        for shard in split_shards(self.shards_dir, split):
            try:
                for raw in iter_shard(shard, self.allow_pipe):
                    try:
                        rows.append(decode_sample(raw, self.decode, train=False))
                    except ValueError:
                        continue
                    if len(rows) == n:
                        break
            except (ShardError, OSError):
                continue
            if len(rows) == n:
                break
        if not rows:
            raise ValueError(f"split {split!r} of {self.shards_dir} has no decodable sample")
        return images_to_float(BatchCollate(self.tokenizer, self.max_text_len)(rows))
