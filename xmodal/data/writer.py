"""Write WebDataset shards from users' own files (``xmodal-shards write``).

Sources, each read into ``SourceRow``s by a small reader:

- a folder of files sharing a stem: ``x.jpg`` + ``x.txt`` (one caption per non-empty line)
  [+ ``x.wav``/``x.flac``] [+ ``x.cls`` holding an integer label];
- JSONL, one object per line: ``{"image": path, "caption": str | [str], "audio": path?, "label": int?}``;
- CSV (or TSV) with the same columns (a caption cell may hold a JSON list of captions);
- a COCO captions JSON + image folder: all captions of an image become one sample.

``write_shards`` validates every row (image opened, verified and decoded; captions non-empty; files
present), writes the good ones as ``<out>/<split>/shard-NNNNNN.tar`` plus ``<out>/sizes.json``, and
counts every skipped row by reason, keeping the first few examples, so nothing is dropped silently.
Everything is written into a temporary sibling directory that is renamed into place at the end: an
interrupted run leaves nothing half-made at ``out``.

Each sample holds ``KEY.jpg|png``, ``KEY.txt`` (first caption), ``KEY.json`` (``{"captions": [...],
"source": path, "label"?: int, "audio"?: path}``), ``KEY.wav|flac`` (bytes copied) and ``KEY.cls``
when a label is given. Keys are safe and unique and have no dots (WebDataset splits the key at the
first dot of a member name).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import secrets
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from PIL import Image, ImageOps, UnidentifiedImageError

from xmodal.console import progress_counter
from xmodal.data.shards import check_sample, write_sizes

FORMATS = ("folder", "jsonl", "csv", "coco")
IMAGE_FORMATS = ("keep", "png", "jpg")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
AUDIO_SUFFIXES = {".wav": "wav", ".flac": "flac"}
DEFAULT_MAX_SHARD_BYTES = 256 * 1024**2
DEFAULT_MAX_PIXELS = 50_000_000  # below PIL's own 89 MP bomb warning; a caption dataset needs far less
EXAMPLES_PER_REASON = 3
_MAX_KEY_LENGTH = 80  # keeps member names under tar's 100-character limit (no PAX headers)

# Skip reasons: the keys of ``WriteReport.skipped`` and of ``sizes.json["skipped"]``.
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
IMAGE_TOO_LARGE = "image too large"
MISSING_CAPTION = "missing caption"
EMPTY_CAPTION = "empty caption"
MISSING_AUDIO = "missing audio"
BAD_AUDIO = "bad audio"
BAD_LABEL = "bad label"
BAD_ROW = "bad row"
UNSUPPORTED_FILE = "unsupported file"


@dataclass(frozen=True)
class SourceRow:
    """One input row as a reader found it; validated only when written.

    ``location`` names the row in reports (``rows.jsonl:12``, a file path, ``COCO image 42``);
    ``key`` is a key hint (file stem, COCO id) that is made safe and unique when written;
    ``problem`` is set by a reader for a row it could not parse: ``(reason, detail)``.
    """

    location: str
    key: str
    image: Path | None = None
    captions: tuple[str, ...] = ()
    audio: Path | None = None
    label: int | None = None
    problem: tuple[str, str] | None = None


@dataclass(frozen=True)
class WriteOptions:
    """How to write; see ``xmodal-shards write --help`` for each option."""

    split: str = "train"
    val_fraction: float = 0.0
    test_fraction: float = 0.0
    samples_per_shard: int = 1000
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    resize: int | None = None
    image_format: str = "keep"
    jpeg_quality: int = 90
    max_pixels: int = DEFAULT_MAX_PIXELS
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

    @property
    def written(self) -> int:
        return sum(sum(shards.values()) for shards in self.shards.values())

    def skip(self, reason: str, location: str, detail: str) -> None:
        """Count one skipped row; keep the first few examples of each reason for the summary."""
        self.skipped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(f"{location}: {detail}")


class SkipRow(Exception):
    """A row that cannot be written; carries the reason (a counter key) and a detail for the report."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------------------
# Readers


def detect_format(source: Path) -> str:
    """``folder`` for a directory, else by suffix: .jsonl/.ndjson, .csv/.tsv, .json (COCO)."""
    if source.is_dir():
        return "folder"
    by_suffix = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv", ".json": "coco"}
    fmt = by_suffix.get(source.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"cannot tell the format of {source} from its name: pass --format {'|'.join(FORMATS)}"
        )
    return fmt


def rows_from_source(source: Path, fmt: str = "auto", images: Path | None = None) -> Iterator[SourceRow]:
    """Rows of ``source`` in format ``fmt`` (``auto``: ``detect_format``); ``images`` is the base
    directory of relative paths (JSONL/CSV) or the image folder (COCO), default the source's dir."""
    if not source.exists():
        raise FileNotFoundError(f"source {source} does not exist")
    fmt = detect_format(source) if fmt == "auto" else fmt
    if fmt == "folder":
        if not source.is_dir():
            raise NotADirectoryError(f"--format folder needs a directory, got {source}")
        return rows_from_folder(source)
    if source.is_dir():
        raise ValueError(f"--format {fmt} needs a file, got the directory {source}")
    base = images if images is not None else source.parent
    readers: dict[str, Callable[[Path, Path], Iterator[SourceRow]]] = {
        "jsonl": rows_from_jsonl,
        "csv": rows_from_csv,
        "coco": rows_from_coco,
    }
    if fmt not in readers:
        raise ValueError(f"unknown format {fmt!r}: choose from auto, {', '.join(FORMATS)}")
    return readers[fmt](source, base)


def rows_from_folder(path: str | os.PathLike[str]) -> Iterator[SourceRow]:
    """Rows from files sharing a stem (searched recursively; hidden files and folders are ignored).

    Every file is accounted for: a caption or audio file without an image, an image without a
    caption file, and files of other types become rows with a ``problem``.
    """
    root = Path(path)
    groups: dict[Path, list[Path]] = defaultdict(list)
    for file in sorted(root.rglob("*")):
        relative = file.relative_to(root)
        if file.is_file() and not any(part.startswith(".") for part in relative.parts):
            groups[relative.with_suffix("")].append(file)
    for stem, files in sorted(groups.items()):
        yield _folder_row(root, stem, files)


def _folder_row(root: Path, stem: Path, files: list[Path]) -> SourceRow:
    """The row of one stem group; its ``problem`` says what is wrong with the group, if anything."""
    by_kind: dict[str, list[Path]] = defaultdict(list)
    for file in files:
        suffix = file.suffix.lower()
        kind = {".txt": "text", ".cls": "label"}.get(suffix)
        kind = kind or (
            "image" if suffix in IMAGE_SUFFIXES else "audio" if suffix in AUDIO_SUFFIXES else "other"
        )
        by_kind[kind].append(file)
    location = str(files[0].relative_to(root))
    key = str(stem)

    def problem(reason: str, detail: str) -> SourceRow:
        return SourceRow(location=location, key=key, problem=(reason, detail))

    if by_kind["other"]:
        names = ", ".join(f.name for f in by_kind["other"])
        return problem(UNSUPPORTED_FILE, f"{names} (images {sorted(IMAGE_SUFFIXES)}, .txt, .wav/.flac, .cls)")
    if any(len(found) > 1 for found in by_kind.values()):
        names = ", ".join(f.name for f in files)
        return problem(BAD_ROW, f"several files of one kind share the stem: {names}")
    if not by_kind["image"]:
        return problem(MISSING_IMAGE, f"no image file with the stem of {', '.join(f.name for f in files)}")
    image = by_kind["image"][0]
    location = str(image.relative_to(root))
    if not by_kind["text"]:
        return SourceRow(location, key, problem=(MISSING_CAPTION, f"no {stem.name}.txt next to the image"))
    try:
        captions = tuple(by_kind["text"][0].read_text(encoding="utf-8").splitlines())
        label = _parse_label(by_kind["label"][0].read_text(encoding="utf-8")) if by_kind["label"] else None
    except (UnicodeDecodeError, OSError) as error:
        return SourceRow(location, key, problem=(BAD_ROW, f"cannot read caption/label file ({error})"))
    except SkipRow as skip:
        return SourceRow(location, key, problem=(skip.reason, skip.detail))
    audio = by_kind["audio"][0] if by_kind["audio"] else None
    return SourceRow(location, key, image=image, captions=captions, audio=audio, label=label)


def rows_from_jsonl(path: str | os.PathLike[str], base: str | os.PathLike[str]) -> Iterator[SourceRow]:
    """Rows of a JSONL file (blank lines ignored); relative paths are taken from ``base``."""
    path = Path(path)
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            location = f"{path.name}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                yield SourceRow(location, "", problem=(BAD_ROW, f"not JSON ({error})"))
                continue
            if not isinstance(record, dict):
                yield SourceRow(location, "", problem=(BAD_ROW, "not a JSON object"))
                continue
            yield row_from_record(record, Path(base), location)


def rows_from_csv(path: str | os.PathLike[str], base: str | os.PathLike[str]) -> Iterator[SourceRow]:
    """Rows of a CSV (``.tsv``: tab-separated) file with a header: image, caption[, audio, label]."""
    path = Path(path)
    with open(path, encoding="utf-8", newline="") as stream:
        reader = csv.DictReader(stream, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        columns = set(reader.fieldnames or [])
        if not {"image", "caption"} <= columns:
            raise ValueError(
                f"{path}: the header must have 'image' and 'caption' columns, got {sorted(columns)}"
            )
        for record in reader:
            location = f"{path.name}:{reader.line_num}"
            caption = record.get("caption") or ""
            if caption.lstrip().startswith("["):  # a cell may hold a JSON list of captions
                with contextlib.suppress(json.JSONDecodeError):  # else: a caption starting with "["
                    record = {**record, "caption": json.loads(caption)}
            yield row_from_record(record, Path(base), location)


def rows_from_coco(
    json_path: str | os.PathLike[str], images_dir: str | os.PathLike[str]
) -> Iterator[SourceRow]:
    """One row per COCO image, with all its captions; an annotation of an unknown image is a bad row."""
    json_path = Path(json_path)
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
        images, annotations = doc["images"], doc["annotations"]
        assert isinstance(images, list) and isinstance(annotations, list)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError) as error:
        raise ValueError(
            f"{json_path} is not a COCO captions file (a JSON object with 'images' and 'annotations' lists): "
            f"{type(error).__name__} {error}"
        ) from error
    ids = {image.get("id") for image in images if isinstance(image, dict)}
    captions: dict[Any, list[str]] = defaultdict(list)
    for number, annotation in enumerate(annotations):
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        if image_id not in ids or not isinstance(annotation.get("caption"), str):
            yield SourceRow(
                f"{json_path.name} annotation #{number}",
                "",
                problem=(BAD_ROW, "needs an 'image_id' of a listed image and a string 'caption'"),
            )
            continue
        captions[image_id].append(annotation["caption"])
    for number, image in enumerate(images):
        if not isinstance(image, dict) or not isinstance(image.get("file_name"), str):
            yield SourceRow(f"{json_path.name} image #{number}", "", problem=(BAD_ROW, "no 'file_name'"))
            continue
        image_id = image.get("id")
        key = f"{image_id:012d}" if isinstance(image_id, int) else str(image_id)  # as COCO file names
        yield SourceRow(
            location=f"COCO image {image_id} ({image['file_name']})",
            key=key,
            image=Path(images_dir) / image["file_name"],
            captions=tuple(captions.get(image_id, ())),
        )


def row_from_record(record: Mapping[str, Any], base: Path, location: str) -> SourceRow:
    """A row from a JSONL object or CSV record; fields: image, caption (str or list), audio?, label?, key?."""
    image = record.get("image")
    if not isinstance(image, str) or not image.strip():
        return SourceRow(location, "", problem=(BAD_ROW, "no 'image' path"))
    caption = record.get("caption", record.get("captions"))
    key = str(record.get("key") or Path(image).stem)
    if caption is None:
        return SourceRow(location, key, problem=(MISSING_CAPTION, "no 'caption' field"))
    captions = (caption,) if isinstance(caption, str) else caption
    if not isinstance(captions, (list, tuple)) or not all(isinstance(c, str) for c in captions):
        return SourceRow(location, key, problem=(BAD_ROW, "'caption' must be a string or a list of strings"))
    audio = record.get("audio") or None  # an empty CSV cell means no audio
    if audio is not None and not isinstance(audio, str):
        return SourceRow(location, key, problem=(BAD_ROW, "'audio' must be a path"))
    try:
        label = _parse_label(record.get("label"))
    except SkipRow as skip:
        return SourceRow(location, key, problem=(skip.reason, skip.detail))
    return SourceRow(
        location=location,
        key=key,
        image=base / image,
        captions=tuple(captions),
        audio=base / audio if audio else None,
        label=label,
    )


def _parse_label(value: Any) -> int | None:
    """An integer label from JSON (int) or text (CSV cell, ``.cls`` file); None when absent."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise SkipRow(BAD_LABEL, f"label must be an integer, got {value!r}")


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


def encode_image(path: Path, options: WriteOptions) -> tuple[str, bytes]:
    """``(extension, bytes)`` of a checked image; raises ``SkipRow`` for a missing/bad/huge one.

    The source bytes are kept when no change is asked for (no re-compression loss); otherwise the
    image is EXIF-rotated, converted to RGB, optionally resized/cropped and re-encoded.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SkipRow(MISSING_IMAGE, f"{path} does not exist") from None
    except OSError as error:
        raise SkipRow(MISSING_IMAGE, f"{path}: {error}") from None
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > options.max_pixels:  # header only: nothing decoded yet
                raise SkipRow(IMAGE_TOO_LARGE, f"{path}: {width}x{height} > {options.max_pixels} pixels")
            source_format = probe.format
            probe.verify()
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # verify() does not decode: a truncated file would only fail in training
            ext = {"JPEG": "jpg", "PNG": "png"}.get(source_format or "")
            target = options.image_format if options.image_format != "keep" else (ext or "png")
            if ext == target and options.resize is None:
                return target, data
            return target, _reencode(image, target, options)
    except Image.DecompressionBombError as error:
        raise SkipRow(IMAGE_TOO_LARGE, f"{path}: {error}") from None
    except UnidentifiedImageError:
        raise SkipRow(UNREADABLE_IMAGE, f"{path}: not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise SkipRow(UNREADABLE_IMAGE, f"{path}: {type(error).__name__}: {error}") from None


def _reencode(image: Image.Image, target: str, options: WriteOptions) -> bytes:
    rgb = ImageOps.exif_transpose(image).convert("RGB")  # bytes are re-encoded, so bake the rotation in
    if options.resize is not None:  # shorter side to N, then the centre N×N
        rgb = ImageOps.fit(rgb, (options.resize, options.resize), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    if target == "jpg":
        rgb.save(buffer, format="JPEG", quality=options.jpeg_quality)
    else:
        rgb.save(buffer, format="PNG")
    return buffer.getvalue()


def build_sample(row: SourceRow, key: str, options: WriteOptions) -> dict[str, bytes]:
    """The shard members of a row, or ``SkipRow`` saying why it cannot be written."""
    if row.problem is not None:
        raise SkipRow(*row.problem)
    captions = [caption.strip() for caption in row.captions if caption.strip()]
    if not row.captions:
        raise SkipRow(MISSING_CAPTION, "no caption")
    if not captions:
        raise SkipRow(EMPTY_CAPTION, "every caption is empty")
    assert row.image is not None  # readers set an image on every row without a problem
    ext, image = encode_image(row.image, options)
    meta: dict[str, Any] = {"captions": captions, "source": str(row.image)}
    sample = {"__key__": key, ext: image, "txt": captions[0].encode("utf-8")}
    if row.audio is not None:
        audio_ext, sample[audio_ext] = _read_audio(row.audio)
        meta["audio"] = str(row.audio)
    if row.label is not None:
        meta["label"] = row.label
        sample["cls"] = str(row.label).encode("utf-8")
    sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return sample


def _read_audio(path: Path) -> tuple[str, bytes]:
    """Audio bytes, copied as-is: checked only by extension and size (decoding is the loader's job)."""
    ext = AUDIO_SUFFIXES.get(path.suffix.lower())
    if ext is None:
        raise SkipRow(BAD_AUDIO, f"{path}: unsupported audio type (use {', '.join(AUDIO_SUFFIXES)})")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SkipRow(MISSING_AUDIO, f"{path}: {error.strerror or error}") from None
    if not data:
        raise SkipRow(BAD_AUDIO, f"{path} is empty")
    return ext, data


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
        report.modalities = [m for m in ("image", "text", "audio", "label") if m in modalities]
        if report.written == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            return report
        sizes = {
            "source": {**(source_info or {}), **_recorded_options(options)},
            "splits": report.shards,
            "modalities": report.modalities,
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
    for row in rows:
        advance()
        try:
            # Keys are chosen after validation, so a bad row does not shift the keys of good ones.
            sample = build_sample(row, "pending", options)
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


def _modalities(sample: Mapping[str, bytes]) -> set[str]:
    names = {"jpg": "image", "png": "image", "txt": "text", "wav": "audio", "flac": "audio", "cls": "label"}
    return {names[ext] for ext in sample if ext in names}
