"""Safe WebDataset tar shards: writing, reading, and the ``sizes.json`` index of a shard directory.

A shard directory holds ``<split>/<shard>.tar`` files and a ``sizes.json``::

    {"splits": {"train": {"shard-000000.tar": 1000, ...}, ...},
     "modalities": ["image", "text", ...],
     "spec": {...}}            # optional: how the data was generated (shapes data)

Other layouts (plain tars, brace patterns, list files, wids indexes, img2dataset output) are
resolved by ``xmodal.data.resolve``; their sample counts come from ``xmodal.data.index``.

Members follow webdataset's naming: the key is the member's path up to the first dot of its file
name, the rest is its extension (``dir/abc.seg.png`` → key ``dir/abc``, member ``seg.png``: role
``seg``). Safety: members are only ever handed out as raw bytes, and only for extensions that a
registered modality reads (:func:`safe_extensions`), optionally after a role. Every other member
(``.npy`` nobody reads, ``.pyd``, ``.pkl``, ``.pth``, ...) is skipped unread, so it can never be
decoded or unpickled; :func:`scan_tar` counts such members for ``xmodal-shards inspect``.
Code-bearing extensions (:data:`CODE_BEARING`) are never handed out, even if a plug-in asks.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import secrets
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from xmodal.files import write_json_atomic

log = logging.getLogger(__name__)

PIPE_PREFIX = "pipe:"
SAFE_EXTENSIONS = frozenset(
    {"png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "txt", "json", "wav", "flac", "cls"}
)
"""What the built-in modalities read; :func:`safe_extensions` adds plug-in modalities' extensions."""
CODE_BEARING = frozenset({"pyd", "pkl", "pickle", "pth", "pt", "ckpt", "joblib"})
"""Formats whose generic loaders run code (pickle, torch.load): never handed to any decoder."""
_ROLE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
SIZES_FILE = "sizes.json"
_HOW_TO_CREATE = "create it with `xmodal-shards synth --out DIR` or `xmodal-shards write ...`"
NO_EXTENSION = "(no key.extension)"
"""The member kind of a member whose name has no ``key.extension`` form (webdataset skips those)."""


DEFAULT_MAX_MEMBER_BYTES = 64 << 20
"""Largest member read into memory (``data.max_member_bytes``): far above any caption or image a
model trains on, far below what a lying header or a gzip bomb would make a worker allocate."""
MAX_MEMBER_ENV = "XMODAL_MAX_MEMBER_BYTES"
"""Carries the run's limit to processes that do not run the factory (spawned loader workers)."""


def _limit_from_env() -> int:
    text = os.environ.get(MAX_MEMBER_ENV, "")
    return int(text) if text.isdigit() and int(text) > 0 else DEFAULT_MAX_MEMBER_BYTES


_max_member_bytes = _limit_from_env()


def max_member_bytes() -> int:
    """The per-member read limit of this process (:func:`set_max_member_bytes`, else the default)."""
    return _max_member_bytes


def set_max_member_bytes(limit: int) -> None:
    """Set the per-member read limit of every shard reader in this process and its children.

    One process-wide setting rather than an argument: shards are read from many places (the
    stream, the tokenizer fit, the index, the FID classifier), and every one must obey the run's
    limit. The environment variable carries it into spawned DataLoader workers (forked ones
    inherit the module state anyway)."""
    global _max_member_bytes
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"data.max_member_bytes must be an integer >= 1, got {limit!r}")
    _max_member_bytes = limit
    os.environ[MAX_MEMBER_ENV] = str(limit)


_safe_cache: tuple[int, frozenset[str]] = (-1, SAFE_EXTENSIONS)


def safe_extensions() -> frozenset[str]:
    """Member extensions handed to decoders: the built-ins' and every registered modality's."""
    global _safe_cache
    from xmodal.registry import MODALITIES

    names = MODALITIES.names()  # loads built-ins and plug-ins first
    if _safe_cache[0] != MODALITIES.version:
        extensions = {e for name in names for e in MODALITIES.get(name).extensions}
        refused = sorted(extensions & CODE_BEARING)
        if refused:
            log.warning("modality extensions %s are code-bearing formats and are never read", refused)
        _safe_cache = (MODALITIES.version, (SAFE_EXTENSIONS | extensions) - CODE_BEARING)
    return _safe_cache[1]


def member_is_safe(ext: str, safe: frozenset[str]) -> bool:
    """``png`` or ``<role>.png`` (a role of letters, digits, ``_`` and ``-``) with a safe last part."""
    if ext in safe:
        return True
    role, dot, last = ext.rpartition(".")
    return last in safe and (not dot or (bool(role) and set(role) <= _ROLE_CHARS))


class DataFailure(RuntimeError):
    """Too many data failures in a row: the data, not the code, is at fault (names the shard).
    Here, not in stream.py, so that the CLI can catch it without importing torch."""


class ShardError(ValueError):
    """A shard that is unsafe or malformed (the message names the shard, and the member or key).

    ``member``: the member refused by itself (too large, an invalid size) while the tar around it
    is sound up to its header, so the sample before it is complete and still handed out."""

    def __init__(self, message: str, member: str | None = None):
        super().__init__(message)
        self.member = member


def split_member_name(name: str) -> tuple[str, str] | None:
    """WebDataset convention: ``dir/abc.seg.png`` → key ``dir/abc``, extension ``seg.png``.

    The key is everything up to the first dot of the basename; None when there is no such split.
    """
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext


_BLOCK = 512
_NUL = b"\0"
_REGULAR = (b"0", b"\0", b"7")  # file, old-style file, contiguous file


def _octal(field: bytes) -> int:
    """A numeric tar header field: octal text, or base-256 when the top bit is set (large sizes).

    -1 for a field that is neither (garbage, a sign, a negative base-256 number): never a valid
    size or checksum, so callers refuse it rather than seek backwards or allocate from it."""
    if field[:1] and field[0] & 0x80:
        return -1 if field[0] & 0x40 else int.from_bytes(field[1:], "big")  # 0xff...: negative
    text = field.partition(b"\0")[0].strip()
    if not text:
        return 0
    return int(text, 8) if text.isdigit() and b"8" not in text and b"9" not in text else -1


def _pax_records(data: bytes) -> dict[str, str]:
    """PAX extended header records: ``"<len> <key>=<value>\\n"``, where len counts the whole record.

    ValueError for a malformed record (a length of 0 would otherwise loop for ever)."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space]) if data[pos:space].isdigit() else 0
        if length <= space - pos + 1 or pos + length > len(data):
            raise ValueError(f"malformed PAX record at byte {pos}")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _tar_members(
    stream: IO[bytes],
    shard: str,
    keep: Callable[[str], bool] | None = None,
    size: int | None = None,
    limit: int | None = None,
) -> Iterator[tuple[str, bytes | None]]:
    """(name, bytes) of every regular member, in order; ``None`` bytes for members ``keep`` rejects.

    Our own reader rather than ``tarfile``: on small members (64×64 JPEGs) tarfile's per-member
    overhead costs as much as decoding the image, and its streaming mode ends quietly on a tar cut
    inside a header. Handles ustar, GNU long names and PAX headers (path, size); checks every
    header checksum; anything but a regular file or directory is refused. A rejected member's bytes
    are skipped unread: by a seek when ``size`` (the file's length, to notice a cut member) is
    given, else read and dropped in bounded chunks.

    Bounded: a member that is read (kept, or a PAX / long-name header) is checked against ``limit``
    (default: :func:`max_member_bytes`) from its header, before anything is allocated, so a header
    claiming 100 GB or a gzip shard inflating to 1 GiB is a ShardError naming shard and member,
    never a MemoryError. Skipped members are not limited: they are never held in memory.
    """
    limit = max_member_bytes() if limit is None else limit
    pending: dict[str, str] = {}
    while True:
        header = stream.read(_BLOCK)
        if not header or header == b"\0" * _BLOCK:
            return  # end of archive (the second zero block and padding need not be read)
        if len(header) < _BLOCK:
            raise ShardError(f"{shard}: unreadable tar (truncated header)")
        stored = _octal(header[148:156])
        # Byte sum with the checksum field read as spaces. Zero bytes add nothing, and a header is
        # mostly zeros: deleting them first (bytes.translate, in C) makes the sum ~3× faster.
        if stored != sum(header.translate(None, _NUL)) - sum(header[148:156].translate(None, _NUL)) + 8 * 32:
            raise ShardError(f"{shard}: unreadable tar (bad header checksum: not a tar, or corrupt)")
        kind = header[156:157]
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if header[257:262] == b"ustar" and header[345:346] != b"\0":
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
        length = _member_length(header, pending, shard, pending.get("path", name))
        padded = -(-length // _BLOCK) * _BLOCK
        wanted = kind in _REGULAR and (keep is None or keep(pending.get("path", name)))
        if (wanted or kind not in _REGULAR) and length > limit:
            raise ShardError(
                f"{shard}: member {pending.get('path', name)!r} claims {length} bytes, over the "
                f"{limit}-byte limit per member (data.max_member_bytes; raise it if such members are expected)",
                pending.get("path", name),
            )
        if size is not None and stream.tell() + length > size:  # before any seek or allocation
            raise ShardError(f"{shard}: unreadable tar (member {name!r} truncated)")
        if kind in _REGULAR and not wanted:
            if size is not None:
                stream.seek(padded, os.SEEK_CUR)
                if stream.tell() - (padded - length) > size:
                    raise ShardError(f"{shard}: unreadable tar (member {name!r} truncated)")
            else:
                _discard(stream, padded, shard, name)
            name, pending = pending.get("path", name), {}
            yield name, None
            continue
        data = stream.read(length)  # exactly the member: slicing off the padding would copy it again
        if len(data) < length or len(stream.read(padded - length)) < padded - length:
            raise ShardError(f"{shard}: unreadable tar (member {name!r} truncated)")
        if kind == b"x":  # PAX header for the next member
            # Writers add PAX headers for mtimes and the like; only path and size matter here.
            pending = _pax_records(data) if b" path=" in data or b" size=" in data else {}
            continue
        if kind == b"L":  # GNU long name for the next member
            pending = {**pending, "path": data.rstrip(b"\0").decode("utf-8", "surrogateescape")}
            continue
        if kind == b"g":  # PAX global header: nothing we use
            continue
        name, pending = pending.get("path", name), {}
        if kind == b"5":
            continue
        if kind not in _REGULAR:
            raise ShardError(f"{shard}: member {name!r} is not a regular file (link or device)")
        yield name, data


def _member_length(header: bytes, pending: dict[str, str], shard: str, name: str) -> int:
    """The member's size from its PAX record or its header; ShardError for a negative or garbage one."""
    if "size" in pending:
        text = pending["size"]
        # Digits only, and not thousands of them (int() refuses over 4300 digits with a ValueError).
        length = int(text) if text.isascii() and text.isdigit() and len(text) <= 64 else -1
    else:
        length = _octal(header[124:136])
    if length < 0:
        field = pending.get("size", header[124:136])
        raise ShardError(
            f"{shard}: unreadable tar (member {name!r} has an invalid size field {field!r})", name
        )
    return length


_READ_ERRORS = (OSError, EOFError, ValueError, OverflowError, zlib.error)
"""What reading a broken shard may raise below our checks (a corrupt deflate stream: zlib.error)."""


def _discard(stream: IO[bytes], n: int, shard: str, name: str) -> None:
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            raise ShardError(f"{shard}: unreadable tar (member {name!r} truncated)")
        n -= len(chunk)


@contextmanager
def _open_tar(path: str | os.PathLike[str] | IO[bytes]) -> Iterator[tuple[IO[bytes], int | None]]:
    """The tar's bytes as a stream, and its length when it can be seeked (a plain file, not gzip).

    gzip-compressed shards (.tar.gz / .tgz) are inflated. A stream passed in is left open for its
    owner; a file opened here is closed here.
    """
    with ExitStack() as owned:
        size = None
        if hasattr(path, "read"):
            stream = path
        else:
            stream = owned.enter_context(open(os.fspath(path), "rb", buffering=1 << 20))  # type: ignore[arg-type]
            size = os.fstat(stream.fileno()).st_size
        magic = stream.peek(2)[:2] if hasattr(stream, "peek") else b""  # type: ignore[union-attr]
        if magic == b"\x1f\x8b":
            stream = owned.enter_context(gzip.GzipFile(fileobj=stream))  # type: ignore[arg-type]
            size = None
        yield stream, size  # type: ignore[misc]


def _shard_name(path: str | os.PathLike[str] | IO[bytes]) -> str:
    return str(getattr(path, "name", "<stream>")) if hasattr(path, "read") else str(path)


def iter_tar_samples(
    path: str | os.PathLike[str] | IO[bytes], max_member_bytes: int | None = None
) -> Iterator[dict[str, bytes | str]]:
    """Stream the samples of one tar shard: ``{"__key__", "__shard__", <ext>: bytes, ...}``.

    Consecutive members with the same key form a sample (tar order, as in WebDataset). Extensions
    are lower-cased; only those of :func:`safe_extensions` (after an optional role: ``x.seg.png`` is
    member ``seg.png``, role ``seg``) are read. Other members, and members without a
    ``key.extension`` name, are skipped unread; a sample of skipped members only is still yielded
    (without members), so sample positions match the index's counts. Raises ``ShardError`` (a
    ValueError) naming the shard and member for a link or other non-file member, a member repeated
    within a sample, an unreadable tar, or a member over ``max_member_bytes`` (default: the process
    setting, :func:`max_member_bytes`; gzip shards are inflated member by member, never whole).
    ``path`` may also be an open binary stream.
    """
    shard = _shard_name(path)
    if is_pipe(path):  # never run here: only iter_shard(url, allow_pipe=True) runs commands
        raise ShardError(f"{shard}: a pipe: shard runs a shell command; refused unless data.allow_pipe=true")
    safe = safe_extensions()

    verdicts: dict[str, bool] = {}  # per extension: a shard holds few kinds, and this runs per member

    def keep(name: str) -> bool:
        base = name[name.rfind("/") + 1 :]
        dot = base.find(".")
        if dot <= 0:
            return False
        ext = base[dot + 1 :]
        verdict = verdicts.get(ext)
        if verdict is None:
            verdict = verdicts[ext] = bool(ext) and member_is_safe(ext.lower(), safe)
        return verdict

    try:
        with _open_tar(path) as (stream, size):
            yield from _group(_tar_members(stream, shard, keep, size, max_member_bytes), shard)
    except _READ_ERRORS as error:
        if isinstance(error, ShardError):
            raise
        raise ShardError(f"{shard}: unreadable tar ({error})") from error  # e.g. a corrupt gzip stream


def _group(
    members: Iterator[tuple[str, bytes | None]], shard: str, names: Callable[[str, str], None] | None = None
) -> Iterator[dict[str, Any]]:
    """Members → samples (consecutive members of one key); members with None bytes are left out.

    ``names(key, ext)`` sees every member with a key (kept or not): what :func:`scan_tar` counts.
    """
    sample: dict[str, Any] = {}
    while True:
        try:
            member, data = next(members)
        except StopIteration:
            break
        except ShardError as error:
            # A member refused by itself (its header is sound) ends the shard; the sample before
            # it is complete when the refused member starts another key.
            refused = split_member_name(error.member) if error.member is not None else None
            if sample and refused is not None and refused[0] != sample["__key__"]:
                yield sample
            raise
        parts = split_member_name(member)
        if parts is None:  # webdataset skips these too (a README, macOS "._x.jpg" files)
            if names is not None:
                names("", NO_EXTENSION)
            continue
        key, ext = parts[0], parts[1].lower()
        if sample and sample["__key__"] != key:
            yield sample
            sample = {}
        if not sample:
            sample = {"__key__": key, "__shard__": shard}
        if names is not None:
            names(key, ext)
        if data is None:
            continue
        if ext in sample:
            raise ShardError(f"{shard}: sample {key!r} has member {ext!r} twice")
        sample[ext] = data
    if sample:
        yield sample


@dataclass
class TarScan:
    """What one pass over a shard's member names found (no member's bytes are read)."""

    keys: list[str] = field(default_factory=list)
    """Sample keys in tar order (one per sample)."""
    kinds: Counter[str] = field(default_factory=Counter)
    """Members per extension (``seg.png``, ``npy``, ...), read or not."""
    dotted: int = 0
    """Samples that look like several samples whose keys hold dots (``img.0000.jpg``: key ``img``)."""
    error: str | None = None
    """Why the shard could not be read to its end (``keys`` then holds the readable samples)."""


def scan_tar(path: str | os.PathLike[str] | IO[bytes]) -> TarScan:
    """Keys and member kinds of a shard, grouped exactly as :func:`iter_tar_samples` reads them.

    Member bytes are seeked over (plain files) or read and dropped (gzip, streams). A shard that
    breaks part-way is not an error here: ``error`` says why and ``keys`` holds what was readable,
    which is what a reader gets from it too.
    """
    shard = _shard_name(path)
    scan = TarScan()
    safe = safe_extensions()
    sample_exts: list[str] = []

    def close_sample() -> None:
        if _looks_dotted(sample_exts, safe):
            scan.dotted += 1
        sample_exts.clear()

    def names(key: str, ext: str) -> None:
        scan.kinds[ext] += 1
        if key:
            sample_exts.append(ext)

    try:
        with _open_tar(path) as (stream, size):
            for sample in _group(_tar_members(stream, shard, lambda _: False, size), shard, names):
                scan.keys.append(sample["__key__"])
                close_sample()
    except _READ_ERRORS as error:
        scan.error = str(error) if isinstance(error, ShardError) else f"{shard}: unreadable tar ({error})"
    return scan


def _looks_dotted(exts: list[str], safe: frozenset[str]) -> bool:
    """Members such as ``0000.jpg`` + ``0001.jpg`` and no plain ``jpg``: keys ``img.0000``, ``img.0001``
    read (as webdataset reads them) as one sample ``img``. Roles with digits only, to spare
    ``src.png`` + ``tgt.png``."""
    by_last: dict[str, int] = {}
    for ext in exts:
        role, dot, last = ext.rpartition(".")
        if dot and last in safe and any(c.isdigit() for c in role):
            by_last[last] = by_last.get(last, 0) + 1
    return any(n >= 2 and last not in exts for last, n in by_last.items())


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
            # An integer mtime: a float one makes tarfile add a PAX header to every member.
            writer = TarWriter(stream, encoder=False, mtime=0)
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


def check_sample(sample: dict[str, bytes | str], path: str | os.PathLike[str]) -> dict[str, Any]:
    """A sample as ``write_tar_shard`` writes it (bytes values), or ValueError naming ``path``.

    For writers that stream into their own ``TarWriter`` but must follow the same rules.
    """
    return _checked_sample(sample, Path(path))


def _checked_sample(sample: dict[str, bytes | str], path: Path) -> dict[str, Any]:
    key = sample.get("__key__")
    if not isinstance(key, str) or not key or "." in key.rpartition("/")[2]:
        raise ValueError(f"{path}: sample key {key!r} must be a non-empty string without dots")
    out: dict[str, Any] = {"__key__": key}
    safe = safe_extensions()
    for ext, value in sample.items():
        if ext == "__key__":
            continue
        if not member_is_safe(ext, safe):
            raise ValueError(f"{path}: sample {key!r} field {ext!r} is not a safe extension {sorted(safe)}")
        out[ext] = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    return out


TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def is_tar_name(name: str) -> bool:
    """A shard file by its name (``.tar``, ``.tar.gz``, ``.tgz``; hidden files are partial writes)."""
    return name.lower().endswith(TAR_SUFFIXES) and not name.startswith(".")


def has_tars(directory: Path) -> bool:
    """Whether any shard file lies in ``directory`` or below it."""
    return any(is_tar_name(p.name) for p in directory.rglob("*") if p.is_file())


def read_sizes(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and check ``<directory>/sizes.json`` (FileNotFoundError with instructions if absent).

    A directory of plain tars without one (webdataset's ``ShardWriter`` output, split folders or
    not) gets the equivalent built by scanning its shards once (``xmodal.data.index``).

    A directory written by img2dataset (``--output_format webdataset``) has no ``sizes.json`` but a
    ``NNNNN_stats.json`` next to each ``NNNNN.tar``; its index is synthesized from those
    (see ``img2dataset_sizes``), so such output is used as-is.
    """
    path = Path(directory) / SIZES_FILE
    if not path.is_file():
        if Path(directory).is_dir() and any(Path(directory).glob(f"*{_STATS_SUFFIX}")):
            return img2dataset_sizes(directory)
        if not Path(directory).is_dir() or has_tars(Path(directory)):
            from xmodal.data.index import sizes_of_source  # lazy: index builds on this module

            try:  # plain tars (webdataset's ShardWriter), a pattern, a list, a wids index: scanned once
                return sizes_of_source(directory)
            except FileNotFoundError:
                pass
        raise FileNotFoundError(
            f"no shard index {path} and no .tar shards (is {directory} a shard directory?): {_HOW_TO_CREATE}"
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
    shard_dirs = sizes.get("shard_dirs", {})
    if not (isinstance(shard_dirs, dict) and all(isinstance(v, str) for v in shard_dirs.values())):
        raise ValueError(f'{path}: "shard_dirs" must map split names to folders (strings)')
    return sizes


_STATS_SUFFIX = "_stats.json"


def img2dataset_sizes(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``sizes.json`` equivalent of an img2dataset webdataset output directory.

    img2dataset writes ``NNNNN.tar`` + ``NNNNN_stats.json`` + ``NNNNN.parquet`` per shard. All
    shards form split "train", stored at the directory root (``"shard_dirs": {"train": ""}``).
    Counts come from the stats' ``successes``: failed downloads are rows of the parquet (and part
    of ``count``) but absent from the tar. A tar without stats is a shard still being written (or
    interrupted), so it is left out, listed under ``"incomplete"``, and logged, never used silently.
    """
    root = Path(directory)
    shards: dict[str, int] = {}
    for stats_path in sorted(root.glob(f"*{_STATS_SUFFIX}")):
        tar_name = stats_path.name[: -len(_STATS_SUFFIX)] + ".tar"
        if not (root / tar_name).is_file():
            continue  # a shard where every download failed writes stats but may have no tar
        try:
            successes = json.loads(stats_path.read_text(encoding="utf-8"))["successes"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f"{stats_path}: not an img2dataset stats file with 'successes' ({error})"
            ) from error
        if not isinstance(successes, int) or isinstance(successes, bool) or successes < 0:
            raise ValueError(f"{stats_path}: 'successes' must be a non-negative integer, got {successes!r}")
        shards[tar_name] = successes
    incomplete = sorted(p.name for p in root.glob("*.tar") if p.name not in shards)
    if incomplete:
        logging.getLogger(__name__).warning(
            "%s: %d tar(s) without %s left out (still being written?): %s",
            root,
            len(incomplete),
            _STATS_SUFFIX,
            ", ".join(incomplete[:5]),
        )
    return {
        "source": {"format": "img2dataset"},
        "splits": {"train": shards},
        "shard_dirs": {"train": ""},
        "modalities": _peek_modalities([root / name for name in shards]),
        "incomplete": incomplete,
    }


def _peek_modalities(shards: list[Path]) -> list[str]:
    """Modalities of the first sample of the first non-empty shard (img2dataset writes them all alike)."""
    for shard in shards:
        for sample in iter_tar_samples(shard):
            return sample_modalities(sample)
    return []


def sample_modalities(sample: dict[str, Any]) -> list[str]:
    """Registered modalities whose default role a raw sample holds (by member extension)."""
    from xmodal.registry import MODALITIES

    return sorted(
        name for name in MODALITIES.names() if any(ext in sample for ext in MODALITIES.get(name).extensions)
    )


def write_sizes(directory: str | os.PathLike[str], sizes: dict[str, Any]) -> Path:
    """Write ``sizes.json`` atomically, so a reader never sees it half written."""
    return write_json_atomic(Path(directory) / SIZES_FILE, sizes, sort_keys=False)  # keeps split order


def _split_entry(
    directory: str | os.PathLike[str], split: str, sizes: dict[str, Any] | None = None
) -> dict[str, int]:
    splits = (sizes or read_sizes(directory))["splits"]
    if split not in splits:
        raise ValueError(
            f"split {split!r} not in {Path(directory) / SIZES_FILE}; available: {sorted(splits)}"
        )
    return splits[split]


def split_shard_sizes(directory: str | os.PathLike[str], split: str) -> list[tuple[str, int]]:
    """Sorted ``(url, samples)`` of ``split``, as listed in ``sizes.json`` (each file must exist).

    Shards live in ``<directory>/<split>/`` unless ``sizes["shard_dirs"][split]`` names another
    folder relative to the directory ("" = the directory itself, as for img2dataset output). A
    name starting with ``pipe:`` is a shell command whose stdout is the tar; it is kept verbatim
    and only ever run by :func:`iter_shard` with ``allow_pipe=True``.
    """
    sizes = read_sizes(directory)
    folder = Path(directory) / sizes.get("shard_dirs", {}).get(split, split)
    entries = sorted(_split_entry(directory, split, sizes).items())
    urls = [(name if is_pipe(name) else str(folder / name), n) for name, n in entries]
    missing = [url for url, _ in urls if not is_pipe(url) and not Path(url).is_file()]
    if missing:
        raise FileNotFoundError(f"shards listed in {Path(directory) / SIZES_FILE} are missing: {missing}")
    return urls


def split_shards(directory: str | os.PathLike[str], split: str) -> list[Path | str]:
    """Sorted shards of ``split`` from ``sizes.json``: file paths, or ``pipe:`` command strings."""
    return [url if is_pipe(url) else Path(url) for url, _ in split_shard_sizes(directory, split)]


def is_pipe(url: str | os.PathLike[str]) -> bool:
    return isinstance(url, str) and url.startswith(PIPE_PREFIX)


def pipe_urls(directory: str | os.PathLike[str]) -> list[str]:
    """Every ``pipe:`` shard listed in ``sizes.json`` (any split)."""
    return sorted(
        {name for split in read_sizes(directory)["splits"].values() for name in split if is_pipe(name)}
    )


def iter_shard(url: str | os.PathLike[str], allow_pipe: bool = False) -> Iterator[dict[str, bytes | str]]:
    """Samples of one shard url: a tar file, an ``http(s)://``/``s3://``/``gs://`` url
    (xmodal/data/remote.py), or — only with ``allow_pipe`` — a ``pipe:`` command.

    webdataset runs ``pipe:`` urls by default; a sizes.json from someone else could then run any
    shell command on every rank, so here it takes ``data.allow_pipe=true``.
    """
    from xmodal.data import remote  # lazy: remote imports this module

    if remote.is_remote(url):
        yield from remote.iter_remote_samples(str(url))
    elif not is_pipe(url):
        yield from iter_tar_samples(url)
    elif not allow_pipe:
        raise ShardError(f"{url}: a pipe: shard runs a shell command; refused unless data.allow_pipe=true")
    else:
        yield from remote.iter_pipe_samples(str(url))


def split_size(directory: str | os.PathLike[str], split: str) -> int:
    """Number of samples in ``split`` according to ``sizes.json``."""
    return sum(_split_entry(directory, split).values())


def cached_dataset(out_dir: Path, kind: str, differences: Callable[[Any], list[str]]) -> bool:
    """True when ``out_dir`` already holds this built-in dataset: ``differences(stored spec)`` of
    its ``sizes.json`` is empty. Raises naming them when it holds another spec, or when ``out_dir``
    holds anything else; False when it is free to create (one check for every generator)."""
    if (out_dir / SIZES_FILE).is_file():
        found = differences(read_sizes(out_dir).get("spec"))
        if not found:
            return True
        raise ValueError(
            f"{out_dir} holds {kind} shards of another spec: differs in {', '.join(found)}; "
            "delete it or choose another directory"
        )
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(
            f"{out_dir} exists but is not a {kind} dataset (no sizes.json): choose another directory"
        )
    return False


def spec_differences(stored: Any, wanted: dict[str, Any]) -> list[str]:
    """``key (stored …, requested …)`` for each key where a stored spec dict differs from ``wanted``."""
    if not isinstance(stored, dict):
        return [f"no spec stored (found {stored!r})"]
    keys = sorted(set(stored) | set(wanted))
    return [
        f"{k} (stored {stored.get(k)!r}, requested {wanted.get(k)!r})"
        for k in keys
        if stored.get(k) != wanted.get(k)
    ]


def publish_dataset(out_dir: Path, fill: Callable[[Path], None]) -> bool:
    """Build a dataset directory with ``fill(tmp)`` and rename it into place atomically.

    ``fill`` writes shards and, last, ``sizes.json`` into a temporary sibling directory, so readers
    never see a partial dataset: an interrupted build leaves nothing at ``out_dir`` (its temporary
    directory is removed, except after SIGKILL). Returns True when another process published
    ``out_dir`` first (our copy is discarded; the caller checks theirs matches).
    """
    import secrets
    import shutil

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would survive the rename and hide a shared cache from others.
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        fill(tmp)
        try:
            os.rename(tmp, out_dir)  # atomic; fails if another process already put a non-empty dir there
        except OSError:
            if not (out_dir / SIZES_FILE).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # also on KeyboardInterrupt: leave no partial copy
        raise
    return False
