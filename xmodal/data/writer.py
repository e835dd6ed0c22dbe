"""Write WebDataset shards from users' own files (``xmodal-shards write``).

The rows come from xmodal/data/sources.py (a folder, JSONL, CSV, COCO); each file of a row is
turned into a shard member by the modality that reads it (``Modality.write_member``: an image is
opened, verified and decoded first; audio is copied). ``write_shards`` validates every row (files
present and readable, captions non-empty), writes the good ones as
``<out>/<split>/shard-NNNNNN.tar`` plus ``<out>/sizes.json``, and counts every skipped row by
reason, keeping the first few examples, so nothing is dropped silently. Everything is written into
a temporary sibling directory that is renamed into place at the end: an interrupted run leaves
nothing half-made at ``out``.

Splits: by default 5 % of the samples go to ``val`` and 5 % to ``test``, chosen by a hash of the
key (the same on every run), so the written folder trains, validates and tests as it is.

Each sample holds ``KEY.jpg|png``, ``KEY.txt`` (first caption), ``KEY.json`` (``{"captions": [...],
"source": path, "label"?: int, "<modality>"?: path}``), ``KEY.wav|flac`` (bytes copied) and
``KEY.cls`` when a label is given. Keys are safe and unique and have no dots (WebDataset splits the
key at the first dot of a member name).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from xmodal.codecs.image_files import FORMATS as IMAGE_FORMATS
from xmodal.console import progress_counter
from xmodal.data.shards import check_sample, write_sizes
from xmodal.data.sources import EMPTY_CAPTION, MISSING_CAPTION, SourceRow
from xmodal.problems import SkipRow
from xmodal.registry import MODALITIES

DEFAULT_MAX_SHARD_BYTES = 256 * 1024**2
DEFAULT_MAX_PIXELS = 50_000_000  # below PIL's own 89 MP bomb warning; a caption dataset needs far less
DEFAULT_VAL_FRACTION = 0.05
DEFAULT_TEST_FRACTION = 0.05
EXAMPLES_PER_REASON = 3
_MAX_KEY_LENGTH = 80  # keeps member names under tar's 100-character limit (no PAX headers)


@dataclass(frozen=True)
class WriteOptions:
    """How to write; see ``xmodal-shards write --help`` for each option."""

    split: str = "train"
    val_fraction: float = DEFAULT_VAL_FRACTION
    test_fraction: float = DEFAULT_TEST_FRACTION
    samples_per_shard: int = 1000
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    resize: int | None = None
    image_format: str = "keep"
    jpeg_quality: int = 90
    max_pixels: int = DEFAULT_MAX_PIXELS
    required_files: tuple[str, ...] | None = None
    """Modalities every row must have a file of; None: ``image`` if the first row with files has
    one, else that row's modalities (a folder of clips + captions needs no image)."""
    force: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.split):
            problems.append(f"split name {self.split!r} must be letters, digits, '_' or '-'")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1):
            problems.append("val/test fractions must be in [0, 1)")
        elif self.val_fraction + self.test_fraction >= 1:
            problems.append("val fraction + test fraction must be < 1 (train would be empty)")
        if self.samples_per_shard < 1:
            problems.append(f"samples per shard must be >= 1 (got {self.samples_per_shard})")
        if self.max_shard_bytes < 10240:
            problems.append(f"max shard bytes must be >= 10240, one tar record (got {self.max_shard_bytes})")
        if self.resize is not None and self.resize < 1:
            problems.append(f"resize must be >= 1 pixel (got {self.resize})")
        if self.image_format not in IMAGE_FORMATS:
            problems.append(f"image format must be one of {IMAGE_FORMATS} (got {self.image_format!r})")
        if not 1 <= self.jpeg_quality <= 100:
            problems.append(f"JPEG quality must be in 1..100 (got {self.jpeg_quality})")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def splits(self) -> tuple[str, ...]:
        """Splits that samples can go to, in ``sizes.json`` order."""
        if self.val_fraction or self.test_fraction:
            return ("train", "val", "test")
        return (self.split,)


@dataclass
class WriteReport:
    """What ``write_shards`` did: shards per split, skips by reason with first examples."""

    out_dir: Path
    shards: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    modalities: list[str] = field(default_factory=list)
    empty_splits: list[str] = field(default_factory=list)  # requested splits that got no sample
    required: tuple[str, ...] = ()  # the modalities every written row has a file of

    @property
    def written(self) -> int:
        return sum(sum(shards.values()) for shards in self.shards.values())

    def skip(self, reason: str, location: str, detail: str) -> None:
        """Count one skipped row; keep the first few examples of each reason for the summary."""
        self.skipped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(f"{location}: {detail}")


# ---------------------------------------------------------------------------------------------
# Samples


class KeyMaker:
    """Safe, unique sample keys: unsafe characters (dots included) become '_', repeats get '-N'."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, hint: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_-]+", "_", hint).strip("_")[:_MAX_KEY_LENGTH] or "sample"
        key, n = base, 0
        while key in self.used:
            n += 1
            key = f"{base}-{n}"
        self.used.add(key)
        return key


def assign_split(key: str, val_fraction: float, test_fraction: float) -> str:
    """train/val/test by a hash of the key: the same key lands in the same split on every run."""
    position = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    if position < test_fraction:
        return "test"
    if position < test_fraction + val_fraction:
        return "val"
    return "train"


def build_sample(
    row: SourceRow, key: str, options: WriteOptions, required: tuple[str, ...] | None = None
) -> dict[str, bytes]:
    """The shard members of a row, or ``SkipRow`` saying why it cannot be written. ``required``:
    the modalities it must have a file of (default ``options.required_files``, else ``image``)."""
    if row.problem is not None:
        raise SkipRow(*row.problem)
    required = required or options.required_files or ("image",)
    for name in required:
        if name not in row.files:
            raise SkipRow(f"missing {name}", f"no {name} file for {row.location}")
    captions = [caption.strip() for caption in row.captions if caption.strip()]
    if not row.captions:
        raise SkipRow(MISSING_CAPTION, "no caption")
    if not captions:
        raise SkipRow(EMPTY_CAPTION, "every caption is empty")
    sample: dict[str, Any] = {"__key__": key}
    meta: dict[str, Any] = {"captions": captions}
    for number, (name, path) in enumerate(row.files.items()):
        ext, sample[ext] = MODALITIES.get(name)().write_member(path, options)
        meta["source" if number == 0 else name] = str(path)  # the first file names the sample's source
    sample["txt"] = captions[0].encode("utf-8")
    if row.label is not None:
        meta["label"] = row.label
        sample["cls"] = str(row.label).encode("utf-8")
    sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return sample


# ---------------------------------------------------------------------------------------------
# Shards


def _tar_bytes(sample: Mapping[str, bytes]) -> int:
    """Bytes a sample adds to a tar: a 512-byte header per member plus its data padded to 512."""
    return sum(512 + -(-len(value) // 512) * 512 for name, value in sample.items() if name != "__key__")


def _tar_file_size(member_bytes: int) -> int:
    """Size of a tar with these member bytes: two zero end blocks, padded to 10240-byte records."""
    return -(-(member_bytes + 1024) // 10240) * 10240


class ShardSink:
    """Streams samples of one split into ``shard-NNNNNN.tar`` files, rolling over by count and bytes.

    A shard never exceeds ``max_shard_bytes`` unless one sample alone does (it gets a shard of its own).
    """

    def __init__(self, folder: Path, samples_per_shard: int, max_shard_bytes: int):
        self.folder = folder
        self.samples_per_shard = samples_per_shard
        self.max_shard_bytes = max_shard_bytes
        self.counts: dict[str, int] = {}
        self._stream: IO[bytes] | None = None
        self._writer: Any = None
        self._name = ""
        self._bytes = 0

    def write(self, sample: dict[str, bytes]) -> None:
        size = _tar_bytes(sample)
        full = self._writer is not None and (
            self.counts[self._name] >= self.samples_per_shard
            or _tar_file_size(self._bytes + size) > self.max_shard_bytes
        )
        if self._writer is None or full:
            self._open_next()
        self._writer.write(check_sample(sample, self.folder / self._name))  # type: ignore[arg-type]
        self.counts[self._name] += 1
        # What was really written (tarfile writes through), so a longer header cannot make us overshoot.
        self._bytes = max(self._bytes + size, self._stream.tell())  # type: ignore[union-attr]

    def _open_next(self) -> None:
        from webdataset import TarWriter  # lazy: webdataset imports torch

        self.close()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._name = f"shard-{len(self.counts):06d}.tar"
        self._stream = open(self.folder / self._name, "wb")  # noqa: SIM115 (closed in close())
        # Fixed mtime: reproducible tars. An int, since a float mtime adds a PAX header to every member.
        self._writer = TarWriter(self._stream, encoder=False, mtime=0)
        self.counts[self._name] = 0
        self._bytes = 0

    def close(self) -> dict[str, int]:
        """Finish the open shard; returns ``{shard name: samples}``."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        return self.counts


# ---------------------------------------------------------------------------------------------
# Output directory


def check_out_dir(out_dir: Path, force: bool, source: Path | None = None) -> None:
    """Refuse to replace an existing non-empty ``out_dir`` without ``force``, and never (even with it)
    one that holds the source, or that is the working, home or root directory."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory")
    if not any(out_dir.iterdir()):
        return
    if not force:
        raise ValueError(f"{out_dir} already exists and is not empty: pass --force to replace it")
    resolved = out_dir.resolve()
    precious = {Path.cwd().resolve(), Path.home().resolve(), Path(resolved.anchor)}
    if resolved in precious or (source is not None and source.resolve().is_relative_to(resolved)):
        raise ValueError(f"refusing to replace {out_dir} (it holds the source, or is cwd/home/root)")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing ``out_dir`` (checked by the caller) is replaced."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        os.rename(old, out_dir)  # put the previous data back rather than leave nothing
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_shards(
    rows: Iterable[SourceRow],
    out_dir: str | os.PathLike[str],
    options: WriteOptions | None = None,
    source_info: Mapping[str, Any] | None = None,
) -> WriteReport:
    """Validate ``rows`` and write the good ones as shards + ``sizes.json`` into ``out_dir``.

    Returns the report; when nothing could be written, ``out_dir`` is left untouched (``report.written
    == 0``). ``source_info`` (source path, format, ...) is stored in ``sizes.json["source"]`` next to
    the options. Raises ValueError when ``out_dir`` exists and is not empty, unless ``options.force``.
    """
    options = options or WriteOptions()
    out_dir = Path(out_dir)
    source_path = Path(source_info["path"]) if source_info and "path" in source_info else None
    check_out_dir(out_dir, options.force, source_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    report = WriteReport(out_dir=out_dir)
    sinks = {
        split: ShardSink(tmp / split, options.samples_per_shard, options.max_shard_bytes)
        for split in options.splits
    }
    try:
        modalities: set[str] = set()
        with progress_counter(options.progress, "rows read") as advance:
            _write_rows(rows, options, sinks, report, modalities, advance)
        report.shards = {split: sink.close() for split, sink in sinks.items() if sink.counts}
        report.empty_splits = [split for split in options.splits if split not in report.shards]
        report.modalities = [m for m in MODALITIES.names() if m in modalities]
        if report.written == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            return report
        sizes = {
            "source": {**(source_info or {}), **_recorded_options(options)},
            "splits": report.shards,
            "modalities": report.modalities,
            "required": list(report.required),
            "skipped": dict(report.skipped),
        }
        write_sizes(tmp, sizes)  # last: a directory with sizes.json is complete
        check_out_dir(out_dir, options.force, source_path)  # again: it may have appeared meanwhile
        _move_into_place(tmp, out_dir)
    except BaseException:
        for sink in sinks.values():
            sink.close()
        shutil.rmtree(tmp, ignore_errors=True)  # also on KeyboardInterrupt: leave no partial copy
        raise
    return report


def _recorded_options(options: WriteOptions) -> dict[str, Any]:
    """The options that shaped the data (not force/progress, which only shaped the run)."""
    recorded = asdict(options)
    for name in ("force", "progress"):
        recorded.pop(name)
    return recorded


def _write_rows(
    rows: Iterable[SourceRow],
    options: WriteOptions,
    sinks: dict[str, ShardSink],
    report: WriteReport,
    modalities: set[str],
    advance: Callable[[], None],
) -> None:
    make_key = KeyMaker()
    report.required = options.required_files or ()
    for row in rows:
        advance()
        if not report.required and row.files and row.problem is None:
            report.required = required_of(row)
        try:
            # Keys are chosen after validation, so a bad row does not shift the keys of good ones.
            sample = build_sample(row, "pending", options, report.required or None)
        except SkipRow as skip:
            report.skip(skip.reason, row.location, skip.detail)
            continue
        sample["__key__"] = key = make_key(row.key)
        split = (
            assign_split(key, options.val_fraction, options.test_fraction)
            if len(options.splits) > 1
            else options.split
        )
        sinks[split].write(sample)
        modalities.update(_modalities(sample))


def required_of(row: SourceRow) -> tuple[str, ...]:
    """What every row must have when the user did not say: an image if this (first) row has one
    (a photo folder with a few extra clips), else every modality it has (clips + captions)."""
    return ("image",) if "image" in row.files else tuple(row.files)


def _modalities(sample: Mapping[str, bytes]) -> set[str]:
    """Names of the modalities that read some member of ``sample`` (from their extensions)."""
    return {
        name for name, modality in MODALITIES.items() if any(ext in sample for ext in modality.extensions)
    }
