"""Safe WebDataset tar shards: writing, reading, and the ``sizes.json`` index of a shard directory.

A shard directory holds ``<split>/<shard>.tar`` files and a ``sizes.json``::

    {"splits": {"train": {"shard-000000.tar": 1000, ...}, ...},
     "modalities": ["image", "text", ...],
     "spec": {...}}            # optional: how the data was generated (shapes data)

Safety: shard members are only ever handed out as raw bytes, and only for extensions in
``SAFE_EXTENSIONS`` (images, text, JSON, audio, class ids). Anything else — ``.pyd``, ``.pkl``,
``.pth``, ... which a generic WebDataset decoder would unpickle or ``torch.load`` — makes
``iter_tar_samples`` raise instead of being silently skipped, so a tampered shard is noticed.
"""

from __future__ import annotations

import json
import os
import secrets
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

SAFE_EXTENSIONS = {"png", "jpg", "jpeg", "txt", "json", "wav", "flac", "cls"}
SIZES_FILE = "sizes.json"
_HOW_TO_CREATE = "create it with `xmodal-shards synth --out DIR` or `xmodal-shards write ...`"


class ShardError(ValueError):
    """A shard that is unsafe or malformed (the message names the shard, and the member or key)."""


def split_member_name(name: str) -> tuple[str, str] | None:
    """WebDataset convention: ``dir/abc.seg.png`` → key ``dir/abc``, extension ``seg.png``.

    The key is everything up to the first dot of the basename; None when there is no such split.
    """
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext


def iter_tar_samples(path: str | os.PathLike[str] | IO[bytes]) -> Iterator[dict[str, bytes | str]]:
    """Stream the samples of one tar shard: ``{"__key__", "__shard__", <ext>: bytes, ...}``.

    Consecutive members with the same key form a sample (tar order, as in WebDataset).
    Extensions are lower-cased and must be one of ``SAFE_EXTENSIONS`` exactly (``x.seg.png`` is
    refused too: only plain extensions reach decoders). Raises ``ShardError`` (a ValueError) naming
    the shard and member for an unsafe extension, a member without key or extension, a link or
    other non-file member, a member repeated within a sample, or an unreadable tar.
    ``path`` may also be an open binary stream (e.g. from a remote opener).
    """
    shard = str(getattr(path, "name", "<stream>")) if hasattr(path, "read") else str(path)
    sample: dict[str, bytes | str] = {}
    # Streaming mode ("r|*"): no seeks, so pipes and remote streams work, and memory stays flat.
    source = {"fileobj": path} if hasattr(path, "read") else {"name": os.fspath(path)}  # type: ignore[arg-type]
    try:
        with tarfile.open(mode="r|*", **source) as tar:
            for member in tar:
                if member.isdir():
                    continue
                if not member.isfile():
                    raise ShardError(
                        f"{shard}: member {member.name!r} is not a regular file (link or device)"
                    )
                parts = split_member_name(member.name)
                if parts is None:
                    raise ShardError(f"{shard}: member {member.name!r} has no 'key.extension' name")
                key, ext = parts[0], parts[1].lower()
                if ext not in SAFE_EXTENSIONS:
                    raise ShardError(
                        f"{shard}: member {member.name!r} has unsafe extension {ext!r} "
                        f"(allowed: {sorted(SAFE_EXTENSIONS)}; shard members are never unpickled)"
                    )
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                if not sample:
                    sample = {"__key__": key, "__shard__": shard}
                if ext in sample:
                    raise ShardError(f"{shard}: sample {key!r} has member {ext!r} twice")
                data = tar.extractfile(member)
                sample[ext] = data.read() if data is not None else b""
    except (tarfile.TarError, EOFError) as error:  # truncated / corrupt / not a tar
        raise ShardError(f"{shard}: unreadable tar ({error})") from error
    if sample:
        yield sample


def write_tar_shard(
    path: str | os.PathLike[str],
    samples: Iterable[dict[str, bytes | str]],
    on_sample: Callable[[], None] | None = None,
) -> int:
    """Write samples to one tar shard, atomically (temporary file, then rename); returns the count.

    Members get a fixed mtime so equal samples give byte-identical shards. Samples are checked with
    the reader's rules (safe extensions, a ``__key__`` without dots) so a written shard always reads.
    """
    from webdataset import TarWriter  # lazy: webdataset imports torch (~1 s), readers don't need it

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    count = 0
    try:
        with open(tmp, "wb") as stream:
            writer = TarWriter(stream, encoder=False, mtime=0.0)
            try:
                for sample in samples:
                    writer.write(_checked_sample(sample, path))
                    count += 1
                    if on_sample is not None:
                        on_sample()
            finally:
                writer.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


def _checked_sample(sample: dict[str, bytes | str], path: Path) -> dict[str, Any]:
    key = sample.get("__key__")
    if not isinstance(key, str) or not key or "." in key.rpartition("/")[2]:
        raise ValueError(f"{path}: sample key {key!r} must be a non-empty string without dots")
    out: dict[str, Any] = {"__key__": key}
    for ext, value in sample.items():
        if ext == "__key__":
            continue
        if ext not in SAFE_EXTENSIONS:
            raise ValueError(
                f"{path}: sample {key!r} field {ext!r} is not a safe extension {sorted(SAFE_EXTENSIONS)}"
            )
        out[ext] = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    return out


def read_sizes(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and check ``<directory>/sizes.json`` (FileNotFoundError with instructions if absent)."""
    path = Path(directory) / SIZES_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no shard index {path} (is {directory} a shard directory?): {_HOW_TO_CREATE}"
        )
    try:
        sizes = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): regenerate it; {_HOW_TO_CREATE}") from error
    splits = sizes.get("splits") if isinstance(sizes, dict) else None
    well_formed = isinstance(splits, dict) and all(
        isinstance(shards, dict)
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shards.values())
        for shards in splits.values()
    )
    if not well_formed:
        raise ValueError(f'{path} must map "splits" to {{split: {{shard file: sample count}}}}')
    return sizes


def write_sizes(directory: str | os.PathLike[str], sizes: dict[str, Any]) -> Path:
    """Write ``sizes.json`` atomically, so a reader never sees it half written."""
    path = Path(directory) / SIZES_FILE
    tmp = path.with_name(f".{SIZES_FILE}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.write_text(json.dumps(sizes, indent=2) + "\n", encoding="utf-8")  # keeps split order
    os.replace(tmp, path)
    return path


def _split_entry(directory: str | os.PathLike[str], split: str) -> dict[str, int]:
    splits = read_sizes(directory)["splits"]
    if split not in splits:
        raise ValueError(
            f"split {split!r} not in {Path(directory) / SIZES_FILE}; available: {sorted(splits)}"
        )
    return splits[split]


def split_shards(directory: str | os.PathLike[str], split: str) -> list[Path]:
    """Sorted shard paths of ``split``, as listed in ``sizes.json`` (each one must exist)."""
    shards = [Path(directory) / split / name for name in sorted(_split_entry(directory, split))]
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"shards listed in {Path(directory) / SIZES_FILE} are missing: {missing}")
    return shards


def split_size(directory: str | os.PathLike[str], split: str) -> int:
    """Number of samples in ``split`` according to ``sizes.json``."""
    return sum(_split_entry(directory, split).values())
