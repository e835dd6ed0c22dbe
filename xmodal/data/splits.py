"""A run's train/val/test shards: from the data's folders or index, explicit sources, or carved.

``resolve_splits(spec, settings)`` → :class:`DataSplits` (``ShardInfo`` lists per split, how each
split was found, warnings). Rules, in order:

1. ``data.val_shards`` / ``data.test_shards`` (any source form, ``xmodal.data.resolve``) replace
   those splits of ``data.shards`` (of every source, with ``data.sources``: ``resolve_explicit``);
   a shard that is also a training shard is refused.
2. The source's own splits: ``sizes.json``, split folders (``train/ val/ test/``).
3. A split still missing is **carved** from train by key hash (``xmodal.data.carve``):
   ``data.val_fraction`` / ``data.test_fraction``, :data:`DEFAULT_FRACTION` when unset. Carving a
   split the data already has is refused (set the fraction to 0 or leave it unset), and a
   fraction of 0 leaves the split missing: a run then stops before starting, saying so.

Counts stated by the source are used as they are unless a scan was needed anyway (carving, or no
count stated): then the scanned count wins and a disagreement is reported in ``warnings``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmodal.data.carve import Carve, kept
from xmodal.data.epoch_plan import ShardInfo
from xmodal.data.index import ShardCounts, index_shards
from xmodal.data.resolve import Source, resolve_source
from xmodal.data.shards import iter_shard

DEFAULT_FRACTION = 0.05
"""Share of train carved as val (and as test) when the data has no such split of its own."""
INDEX_DIR = "shard-index"
"""Folder of ``paths.data_dir`` holding the cached shard indexes."""
_STATED_BY = {"sizes.json": "sizes.json", "img2dataset": "its _stats.json", "wids": "the wids index"}
_STATED_BY |= {"remote sizes.json": "sizes.json", "remote wids": "the wids index"}


@dataclass(frozen=True)
class SplitSettings:
    """The ``data.*`` keys that decide splits (``SplitSettings.from_config(cfg)``)."""

    val_shards: str | None = None
    test_shards: str | None = None
    val_fraction: float | None = None
    test_fraction: float | None = None
    index_dir: str | None = None
    """Where scanned indexes are cached (None: in this process only)."""
    allow_pipe: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> SplitSettings:
        d = cfg.data
        data_dir = Path(str(cfg.paths.data_dir)).expanduser()
        data_dir = data_dir if data_dir.is_absolute() else Path.cwd() / data_dir
        return cls(
            val_shards=d.val_shards,
            test_shards=d.test_shards,
            val_fraction=d.val_fraction,
            test_fraction=d.test_fraction,
            index_dir=str(data_dir / INDEX_DIR),
            allow_pipe=bool(d.allow_pipe),
        )


@dataclass
class DataSplits:
    """Shards per split, with how each split came to be (for logs, ``inspect`` and errors)."""

    spec: str
    source: Source
    splits: dict[str, list[ShardInfo]]
    how: dict[str, str]
    carve: Carve
    counts: dict[str, ShardCounts] = field(default_factory=dict)
    """Every scanned shard's counts (member kinds, dotted keys, read errors)."""
    warnings: list[str] = field(default_factory=list)
    groups: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Of several sources (``Mix.data``): per split, how many of its shards each source gives, in
    order (``(2, 6)``: the first 2 are one source's); a split not named is one source's."""

    def shards(self, split: str) -> list[ShardInfo]:
        """The split's shards; ValueError naming the data and the fix when it has none."""
        if split not in self.splits:
            raise ValueError(
                f"split {split!r} not in {self.spec} (splits: {', '.join(sorted(self.splits))}); "
                f"{_fix(split)}"
            )
        shards = self.splits[split]
        if not shards and self.how[split].startswith("carved"):
            raise ValueError(
                f"split {split!r} carved from {self.spec} is empty ({self.how[split]}): raise "
                f"data.{split}_fraction or point data.{split}_shards at its shards"
            )
        unreadable = next((c.error for c in self.counts.values() if c.error and not c.samples), None)
        if not shards and unreadable:  # the likely cause, in the same line
            raise ValueError(f"split {split!r} of {self.spec} has no readable sample: {unreadable}")
        if not shards:
            raise ValueError(
                f"split {split!r} of {self.spec} lists no shards ({self.how[split]}); {_fix(split)}"
            )
        return shards

    def size(self, split: str) -> int:
        return sum(sh.num_samples for sh in self.splits.get(split, []))


def _fix(split: str) -> str:
    if split not in ("val", "test"):
        return "add a folder of that name or point data.shards elsewhere"
    return (
        f"carve one with data.{split}_fraction={DEFAULT_FRACTION} (by key hash), point "
        f"data.{split}_shards at its shards, or add a {split}/ folder"
    )


def resolve_splits(spec: str | os.PathLike[str], settings: SplitSettings | None = None) -> DataSplits:
    """The run's splits of ``spec`` (module docstring). ValueError/FileNotFoundError name the fault."""
    settings = settings or SplitSettings()
    text = os.fspath(spec)
    source = resolve_source(text)
    urls: dict[str, list[str]] = {split: list(u) for split, u in source.splits.items()}
    how = dict.fromkeys(urls, source.kind)
    stated = dict(source.stated)
    stated_by = dict.fromkeys(source.stated, _STATED_BY.get(source.kind, source.kind))
    for split, override in explicit_splits(settings).items():
        urls[split], other = _explicit_urls(split, override)
        how[split] = f"data.{split}_shards"
        stated.update(other.stated)
        stated_by.update(dict.fromkeys(other.stated, _STATED_BY.get(other.kind, other.kind)))
    if "train" not in urls:
        raise ValueError(
            f"{text} has no train split (splits: {', '.join(sorted(urls))}): add a train/ folder"
        )
    for split in explicit_splits(settings):
        check_apart(split, urls[split], urls["train"], f"the train split of {text}")

    fractions = {}
    for split, given in (("val", settings.val_fraction), ("test", settings.test_fraction)):
        if given is None:
            fractions[split] = 0.0 if split in urls else DEFAULT_FRACTION
        elif given > 0 and split in urls:
            raise ValueError(
                f"data.{split}_fraction={given}: {text} has its own {split} split ({how[split]}); "
                f"leave data.{split}_fraction unset or 0"
            )
        else:
            fractions[split] = float(given)
    carve = Carve(fractions["val"], fractions["test"])

    train = urls["train"]
    carved_from = set(train)
    others = sorted({u for split, us in urls.items() if split != "train" for u in us} - set(train))
    counts = index_shards(train, carve, settings.index_dir, settings.allow_pipe) if carve.active else {}
    unstated = [u for u in (others if carve.active else [*train, *others]) if u not in stated]
    counts |= index_shards(unstated, None, settings.index_dir, settings.allow_pipe)

    warnings = []
    for url, c in counts.items():
        if url in stated and stated[url] != c.samples:
            diff = c.samples - stated[url]
            warnings.append(
                f"{url}: holds {c.samples} samples, {stated_by[url]} says {stated[url]} "
                f"({abs(diff)} {'more' if diff > 0 else 'fewer'}); using {c.samples}"
            )
        if c.error:
            warnings.append(f"{url}: readable up to sample {c.samples} only: {c.error}")

    def info(url: str, split: str) -> ShardInfo:
        if carve.active and url in carved_from:
            return ShardInfo(url, counts[url].carved[split], carve.ranges()[split])  # type: ignore[index]
        return ShardInfo(url, counts[url].samples if url in counts else stated[url])

    splits: dict[str, list[ShardInfo]] = {}
    for split, us in urls.items():
        splits[split] = [info(u, split) for u in us]
    for split in carve.ranges():
        if split == "train" or split in urls:
            continue
        splits[split] = [info(u, split) for u in train]
        how[split] = (
            f"carved from train: {fractions[split]:g} of its samples by key hash (data.{split}_fraction)"
        )
    if carve.active:
        how["train"] += f", less the carved {' and '.join(s for s in ('val', 'test') if fractions[s])}"
        for split in carve.ranges():
            splits[split] = [sh for sh in splits[split] if sh.num_samples > 0]  # nothing to open
    return DataSplits(text, source, splits, how, carve, counts, warnings)


def explicit_splits(settings: SplitSettings) -> dict[str, str]:
    """``{"val": data.val_shards, "test": data.test_shards}``, the ones that are set."""
    given = {"val": settings.val_shards, "test": settings.test_shards}
    return {split: spec for split, spec in given.items() if spec is not None}


def _explicit_urls(split: str, override: str) -> tuple[list[str], Source]:
    """The shards ``data.{split}_shards`` names: its own ``split`` when it has splits (a dataset
    folder with ``val/``), else every shard it holds."""
    other = resolve_source(override)
    if other.has_own_splits and split not in other.splits:
        raise ValueError(
            f"data.{split}_shards={override!r} has splits {sorted(other.splits)} but no {split!r}"
        )
    return (list(other.splits[split]) if other.has_own_splits else other.urls()), other


def check_apart(split: str, explicit: list[str], train: list[str], what: str) -> None:
    """ValueError when an explicit val/test shard is also a training shard (its samples would be
    scored as held out while trained on)."""
    trained = {_same_file(url) for url in train}
    both = [url for url in explicit if _same_file(url) in trained]
    if both:
        more = f" and {len(both) - 1} more" if len(both) > 1 else ""
        raise ValueError(
            f"data.{split}_shards: {both[0]}{more} is also in {what}: held-out samples would be trained on"
        )


def _same_file(url: str) -> str:
    return url if "://" in url or url.startswith("pipe:") else os.path.abspath(url)


@dataclass
class ExplicitSplit:
    """``data.val_shards`` or ``data.test_shards`` resolved on its own (for ``data.sources``, where
    it is the run's split whatever the sources hold)."""

    spec: str
    shards: list[ShardInfo]
    counts: dict[str, ShardCounts]
    warnings: list[str]


def resolve_explicit(split: str, settings: SplitSettings) -> ExplicitSplit:
    """The shards of ``data.{split}_shards`` with their counts: stated by the source, else indexed
    (cached as any scan). ValueError/FileNotFoundError name the key."""
    spec = explicit_splits(settings)[split]
    try:
        urls, other = _explicit_urls(split, spec)
    except (ValueError, OSError) as error:
        message = str(error)
        prefix = "" if message.startswith(f"data.{split}_shards") else f"data.{split}_shards: "
        raise type(error)(prefix + message) from error
    unstated = [u for u in urls if u not in other.stated]
    counts = index_shards(sorted(set(unstated)), None, settings.index_dir, settings.allow_pipe)
    warnings = [
        f"{url}: readable up to sample {c.samples} only: {c.error}" for url, c in counts.items() if c.error
    ]
    shards = [ShardInfo(u, counts[u].samples if u in counts else other.stated[u]) for u in urls]
    return ExplicitSplit(spec, shards, counts, warnings)


def iter_split_records(data: DataSplits, split: str, allow_pipe: bool = False) -> Iterator[dict[str, Any]]:
    """Raw records of one split in shard order (a carved split: only its keys)."""
    for shard in data.shards(split):
        yield from kept(iter_shard(shard.url, allow_pipe), shard.keep)


def split_problems(spec: str, settings: SplitSettings, needed: tuple[str, ...]) -> list[str]:
    """Config problems of the data: unreadable source, a needed split missing or empty. One line each."""
    try:
        data = resolve_splits(spec, settings)
    except (ValueError, OSError) as error:
        return [f"data.shards: {error}"]
    problems = []
    for split in needed:
        try:
            if data.size(split) == 0:
                data.shards(split)  # names the split and its source
                problems.append(
                    f"data.shards: split {split!r} of {spec} has no samples ({data.how[split]}); {_fix(split)}"
                )
        except ValueError as error:
            problems.append(f"data.shards: {error}")
    return problems
