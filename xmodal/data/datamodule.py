"""The LightningDataModule: WebDataset tar shards streamed by ``xmodal.data.stream``.

Training uses ``data.mode`` (``exact``: every sample once per epoch across ranks × workers, short
slots padded with rows marked ``valid=False``; ``resampled``: a fixed number of samples per epoch
drawn with replacement). Validation and test are always ``exact``, so metrics over valid rows are
the same on any number of ranks. The train loader's position is saved in checkpoints and a resumed
fit continues with the remaining batches of the epoch.

Splits: ``xmodal.data.splits`` (the data's folders or index, ``data.val_shards``/``test_shards``,
or carved from train by key hash). Several sources (``data.sources``): ``xmodal.data.mix`` (each
split per source, training drawn by weight, val/test concatenated); the samples an epoch draws per
source are logged as ``data/source/<name>_samples`` when the epoch starts. Batches: one entry per role, as its modality collates it
(xmodal/data/batch.py).
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L

from xmodal.data.batch import BatchCollate, DecodeSpec, decode_sample, to_model_units
from xmodal.data.carve import kept
from xmodal.data.epoch_plan import ShardInfo, Topology
from xmodal.data.loader import StreamLoader
from xmodal.data.mix import Mix, SourceSpec, TrainMix, resolve_mix, source_draws
from xmodal.data.shards import ShardError, iter_shard
from xmodal.data.splits import DataSplits, SplitSettings, iter_split_records, resolve_splits
from xmodal.data.stream import ShardStream
from xmodal.modalities.text import sample_captions
from xmodal.tokenizers.base import Tokenizer
from xmodal.tokenizers.build import fit_tokenizer, max_fit_captions

__all__ = [
    "BatchCollate",
    "DecodeSpec",
    "ShardDataModule",
    "SplitSettings",
    "decode_sample",
    "iter_split",
    "sample_captions",
]
log = logging.getLogger(__name__)

# The stream's __len__ is exact per rank whatever the worker count (each worker plays its own slot
# of the epoch plan), which Lightning cannot know when it warns about it.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


def iter_split(shards_dir: Path, split: str, allow_pipe: bool = False) -> Iterator[dict[str, Any]]:
    """Raw records of a split with the default split settings (``ShardDataModule.iter_split`` uses
    the run's)."""
    yield from iter_split_records(
        resolve_splits(shards_dir, SplitSettings(allow_pipe=allow_pipe)), split, allow_pipe
    )


def fit_captions(
    data: DataSplits, limit: int, allow_pipe: bool = False, skipped: list[str] | None = None
) -> Iterator[str]:
    """At most ``limit`` training captions, taken evenly from the head of every train shard (not
    all from the first shards, which may hold one source or one language); a shard stops being
    read once its share is taken, so a large dataset is never read whole. A carved train split
    gives only its own keys' captions (no val/test leakage). A sample whose captions cannot be read
    (invalid or too deeply nested JSON) and a shard that breaks off are skipped, their messages
    appended to ``skipped``: the tokenizer is fitted on the rest."""
    shards = data.shards("train")
    share = math.ceil(limit / max(len(shards), 1))
    skips = skipped if skipped is not None else []

    def readable(records: Iterator[dict[str, Any]]) -> Iterator[str]:
        try:
            for record in records:
                try:
                    yield from sample_captions(record)
                except ValueError as error:
                    skips.append(str(error))
        except (ShardError, OSError) as error:  # the shard's captions read so far are kept
            skips.append(str(error))

    def of_shard(shard: ShardInfo) -> Iterator[str]:
        records = kept(iter_shard(shard.url, allow_pipe), shard.keep)
        return itertools.islice(readable(records), share)

    return itertools.islice(itertools.chain.from_iterable(of_shard(s) for s in shards), limit)


class ShardDataModule(L.LightningDataModule):
    def __init__(
        self,
        shards_dir: Path,
        batch_size: int,
        num_workers: int,
        decode: DecodeSpec,
        max_text_len: int,
        tokenizer_spec: Mapping[str, Any] | None = None,
        tokenizer: Tokenizer | None = None,
        seed: int = 0,
        mode: str = "exact",
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        max_consecutive_failures: int = 100,
        allow_pipe: bool = False,
        splits: SplitSettings | None = None,
        sources: Sequence[SourceSpec] = (),
    ):
        super().__init__()
        self.sources = tuple(sources)  # data.sources (then ``shards_dir`` is the first one's)
        self._mix: Mix | None = None
        self._logged_epoch = -1
        self.allow_pipe = allow_pipe
        self.split_settings = splits or SplitSettings(allow_pipe=allow_pipe)
        self._data: DataSplits | None = None
        self.shards_dir = shards_dir if isinstance(shards_dir, str) else Path(shards_dir)  # a url stays a str
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.decode = decode
        self.max_text_len = max_text_len
        self.tokenizer_spec = dict(tokenizer_spec or {})  # data.tokenizer (default: word tokenizer)
        self.tokenizer = tokenizer
        self.seed = seed
        self.mode = mode
        self.samples_per_epoch = samples_per_epoch
        self.shuffle_buffer = shuffle_buffer
        self.max_consecutive_failures = max_consecutive_failures
        self.streams: dict[str, ShardStream] = {}
        self._train_state: dict[str, Any] | None = None  # a resumed fit's stream state, until used

    @property
    def data(self) -> DataSplits:
        """The run's splits, resolved (and indexed, if need be) on first use; warnings logged once."""
        if self._data is None:
            if self.sources:
                self._mix = resolve_mix(self.sources, self.split_settings)
                self._data = self._mix.data
            else:
                self._data = resolve_splits(self.shards_dir, self.split_settings)
            for warning in self._data.warnings:
                log.warning("%s", warning)
        return self._data

    def iter_split(self, split: str) -> Iterator[dict[str, Any]]:
        """Raw records of one split, in shard order (a carved split: only its keys)."""
        return iter_split_records(self.data, split, self.allow_pipe)

    def build_tokenizer(self) -> Tokenizer:
        """Fit ``data.tokenizer`` on a bounded sample of the training captions only (no val/test
        leakage)."""
        limit = max_fit_captions(self.tokenizer_spec)
        skipped: list[str] = []
        captions = fit_captions(self.data, limit, self.allow_pipe, skipped)
        self.tokenizer = fit_tokenizer(self.tokenizer_spec, captions, self.max_text_len)
        if skipped:
            log.warning(
                "%d training sample(s) or shard(s) skipped while reading captions for the tokenizer; "
                "the first: %s",
                len(skipped),
                skipped[0],
            )
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
        shards, weights = self.data.shards(split), None
        if train and self.mix is not None:
            mixed = self.mix.train(self.mode)
            shards, weights = list(mixed.shards), mixed.weights
        stream = ShardStream(
            shards,
            self.mode if train else "exact",
            self.seed,
            topology,
            self.batch_size,
            decode=partial(decode_sample, spec=self.decode, train=train),
            collate=BatchCollate(self.tokenizer, self.max_text_len),
            samples_per_epoch=self.samples_per_epoch if train else None,
            weights=weights,
            # Evaluation order does not matter, and tar order reads each shard once, sequentially.
            shuffle_buffer=self.shuffle_buffer if train else 1,
            max_consecutive_failures=self.max_consecutive_failures,
            allow_pipe=self.allow_pipe,
        )
        if train and self._train_state is not None:
            stream.load_state_dict(self._train_state)
            self._train_state = None
        self.streams[split] = stream
        return StreamLoader(stream, persistent_workers=self.num_workers > 0)

    @property
    def mix(self) -> Mix | None:
        """The resolved ``data.sources`` (None for one ``data.shards``)."""
        _ = self.data
        return self._mix

    def source_counts(self) -> dict[str, int]:
        """Samples the current training epoch draws per source, over every rank (from the plan, the
        same on every rank; skipped samples are counted apart). Empty without ``data.sources`` or a
        train loader."""
        stream = self.streams.get("train")
        if self.mix is None or stream is None:
            return {}
        train: TrainMix = self.mix.train(self.mode)
        return source_draws(stream.plan(), train)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Once per training epoch (its first batch), log the samples it draws per source."""
        trainer = self.trainer
        if (
            self.sources
            and trainer is not None
            and trainer.training
            and trainer.current_epoch != self._logged_epoch
        ):
            self._logged_epoch = trainer.current_epoch
            counts = self.source_counts()
            log.info(
                "epoch %d draws per source: %s",
                trainer.current_epoch,
                ", ".join(f"{name} {n}" for name, n in counts.items()),
            )
            if trainer.is_global_zero:  # the plan's counts are already global
                metrics = {f"data/source/{name}_samples": float(n) for name, n in counts.items()}
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=trainer.global_step)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position, checkpointed with the datamodule as well as with its loader.

        Lightning sizes the epoch from ``len(train_dataloader())`` *before* it hands the loader its
        saved state, and after an elastic resume (another world size or worker count) the resumed
        epoch's length differs from a fresh one; restored here first (Lightning restores datamodules
        before it builds loaders), the loader is built already resumed, with the right length.
        """
        stream = self.streams.get("train")
        return {"train_stream": stream.state_dict()} if stream is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_state = state_dict.get("train_stream")

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
        for shard in self.data.shards(split):
            try:
                for raw in kept(iter_shard(shard.url, self.allow_pipe), shard.keep):
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
        return to_model_units(BatchCollate(self.tokenizer, self.max_text_len)(rows), dict(self.decode.roles))
