"""Users' own files read into ``SourceRow``s for ``xmodal-shards write`` (the writer is writer.py).

Sources, each read by a small reader:

- a folder of files sharing a stem: ``x.jpg`` + ``x.txt`` (one caption per non-empty line)
  [+ ``x.wav``/``x.flac``, or a file of any modality whose ``source_suffixes`` name its suffix]
  [+ ``x.cls`` holding an integer label];
- JSONL, one object per line: ``{"image": path, "caption": str | [str], "audio": path?, "label": int?}``
  (a path field is named after the modality that reads it);
- CSV (or TSV) with the same columns (a caption cell may hold a JSON list of captions);
- a COCO captions JSON + image folder: all captions of an image become one sample.

Which file belongs to which modality is the modalities' own say (``Modality.source_suffixes``,
xmodal/modalities/base.py): a plug-in modality's files are picked up without an edit here.
Captions (``.txt``) and labels (``.cls``) are the row's own fields, not files to copy.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmodal.problems import SkipRow
from xmodal.registry import MODALITIES

FORMATS = ("folder", "jsonl", "csv", "coco")
CAPTION_SUFFIX = ".txt"
LABEL_SUFFIX = ".cls"

# Skip reasons of rows (file-level reasons come from the modalities: "missing image", "bad audio").
MISSING_CAPTION = "missing caption"
EMPTY_CAPTION = "empty caption"
BAD_LABEL = "bad label"
BAD_ROW = "bad row"
UNSUPPORTED_FILE = "unsupported file"
_CAPTION, _LABEL, _OTHER = "<caption>", "<label>", "<other>"  # file kinds beside the modalities' names


@dataclass(frozen=True)
class SourceRow:
    """One input row as a reader found it; validated only when written.

    ``location`` names the row in reports (``rows.jsonl:12``, a file path, ``COCO image 42``);
    ``key`` is a key hint (file stem, COCO id) that is made safe and unique when written;
    ``files`` maps a modality name to the user's file for it; ``problem`` is set by a reader for a
    row it could not parse: ``(reason, detail)``.
    """

    location: str
    key: str
    files: Mapping[str, Path] = field(default_factory=dict)
    captions: tuple[str, ...] = ()
    label: int | None = None
    problem: tuple[str, str] | None = None


def file_modalities() -> dict[str, str]:
    """``{suffix: modality name}`` of every registered modality written from files (first wins)."""
    by_suffix: dict[str, str] = {}
    for name, modality in MODALITIES.items():
        for suffix in modality.source_suffixes:
            by_suffix.setdefault(suffix.lower(), name)
    return by_suffix


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

    Every file is accounted for: a caption file without a media file, and files of types no
    modality writes, become rows with a ``problem`` (or are skipped when written).
    """
    root = Path(path)
    groups: dict[Path, list[Path]] = defaultdict(list)
    for file in sorted(root.rglob("*")):
        relative = file.relative_to(root)
        if file.is_file() and not any(part.startswith(".") for part in relative.parts):
            groups[relative.with_suffix("")].append(file)
    by_suffix = file_modalities()
    for stem, files in sorted(groups.items()):
        yield _folder_row(root, stem, files, by_suffix)


def _folder_row(root: Path, stem: Path, files: list[Path], by_suffix: Mapping[str, str]) -> SourceRow:
    """The row of one stem group; its ``problem`` says what is wrong with the group, if anything."""
    by_kind: dict[str, list[Path]] = defaultdict(list)
    for file in files:
        suffix = file.suffix.lower()
        kind = {CAPTION_SUFFIX: _CAPTION, LABEL_SUFFIX: _LABEL}.get(suffix) or by_suffix.get(suffix, _OTHER)
        by_kind[kind].append(file)
    media = {kind: found[0] for kind, found in by_kind.items() if kind in by_suffix.values()}
    # The location names the media file when there is one (the image, for a caption dataset).
    location = str(next(iter(media.values()), files[0]).relative_to(root))
    key = str(stem)

    def problem(reason: str, detail: str) -> SourceRow:
        return SourceRow(location=location, key=key, problem=(reason, detail))

    if by_kind[_OTHER]:
        names = ", ".join(f.name for f in by_kind[_OTHER])
        return problem(
            UNSUPPORTED_FILE, f"{names} (written: {sorted(by_suffix)}, {CAPTION_SUFFIX}, {LABEL_SUFFIX})"
        )
    if any(len(found) > 1 for found in by_kind.values()):
        names = ", ".join(f.name for f in files)
        return problem(BAD_ROW, f"several files of one kind share the stem: {names}")
    if media and not by_kind[_CAPTION]:
        return problem(MISSING_CAPTION, f"no {stem.name}{CAPTION_SUFFIX} next to {location}")
    try:
        captions = (
            tuple(by_kind[_CAPTION][0].read_text(encoding="utf-8").splitlines()) if by_kind[_CAPTION] else ()
        )
        label = _parse_label(by_kind[_LABEL][0].read_text(encoding="utf-8")) if by_kind[_LABEL] else None
    except (UnicodeDecodeError, OSError) as error:
        return problem(BAD_ROW, f"cannot read caption/label file ({error})")
    except SkipRow as skip:
        return problem(skip.reason, skip.detail)
    return SourceRow(location, key, files=media, captions=captions, label=label)


def rows_from_jsonl(path: str | os.PathLike[str], base: str | os.PathLike[str]) -> Iterator[SourceRow]:
    """Rows of a JSONL file (blank lines ignored); relative paths are taken from ``base``."""
    path = Path(path)
    file_fields = _file_fields()
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
            yield row_from_record(record, Path(base), location, file_fields)


def rows_from_csv(path: str | os.PathLike[str], base: str | os.PathLike[str]) -> Iterator[SourceRow]:
    """Rows of a CSV (``.tsv``: tab-separated) file with a header: caption and a file column per
    modality (image[, audio]), label optional."""
    path = Path(path)
    file_fields = _file_fields()
    with open(path, encoding="utf-8", newline="") as stream:
        reader = csv.DictReader(stream, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        columns = set(reader.fieldnames or [])
        if "caption" not in columns or not columns & set(file_fields):
            raise ValueError(
                f"{path}: the header must have a 'caption' column and a file column "
                f"({', '.join(repr(f) for f in file_fields)}), got {sorted(columns)}"
            )
        for record in reader:
            location = f"{path.name}:{reader.line_num}"
            caption = record.get("caption") or ""
            if caption.lstrip().startswith("["):  # a cell may hold a JSON list of captions
                with contextlib.suppress(json.JSONDecodeError):  # else: a caption starting with "["
                    record = {**record, "caption": json.loads(caption)}
            yield row_from_record(record, Path(base), location, file_fields)


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
            files={"image": Path(images_dir) / image["file_name"]},  # COCO's files are images
            captions=tuple(captions.get(image_id, ())),
        )


def _file_fields() -> list[str]:
    """Record fields that hold a file path: the names of the modalities written from files."""
    return list(dict.fromkeys(file_modalities().values()))


def row_from_record(
    record: Mapping[str, Any], base: Path, location: str, file_fields: list[str] | None = None
) -> SourceRow:
    """A row from a JSONL object or CSV record: caption (str or list), one path field per modality
    (``image``, ``audio``, ...; an empty CSV cell means none), label?, key?."""
    files: dict[str, Path] = {}
    for name in _file_fields() if file_fields is None else file_fields:
        value = record.get(name) or None
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            return SourceRow(location, "", problem=(BAD_ROW, f"'{name}' must be a path"))
        files[name] = base / value
    caption = record.get("caption", record.get("captions"))
    first = next(iter(files.values()), None)
    key = str(record.get("key") or (first.stem if first is not None else ""))
    if caption is None:
        return SourceRow(location, key, problem=(MISSING_CAPTION, "no 'caption' field"))
    captions = (caption,) if isinstance(caption, str) else caption
    if not isinstance(captions, (list, tuple)) or not all(isinstance(c, str) for c in captions):
        return SourceRow(location, key, problem=(BAD_ROW, "'caption' must be a string or a list of strings"))
    try:
        label = _parse_label(record.get("label"))
    except SkipRow as skip:
        return SourceRow(location, key, problem=(skip.reason, skip.detail))
    return SourceRow(location=location, key=key, files=files, captions=tuple(captions), label=label)


def _parse_label(value: Any) -> int | None:
    """An integer label from JSON (int) or text (CSV cell, ``.cls`` file); None when absent."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise SkipRow(BAD_LABEL, f"label must be an integer, got {value!r}")
