"""Sample counts of shards nobody counted: one scan of member names, cached outside the data.

``index_shards(urls, carve, cache_dir)`` → ``{url: ShardCounts}``: samples per shard, per carved
split when carving (``xmodal.data.carve``: keys are hashed at index time, so a carved split's
counts are known before a tar is streamed), member kinds, and whether keys look dotted. A scan
reads tar headers only (member bytes are seeked over), grouped exactly as the reader groups them.

The cache is a JSON file per (shard list, carve) in ``cache_dir`` (a run's
``<paths.data_dir>/shard-index``), named by a hash of every shard's path, size and mtime: a changed
or added shard is a new list and is scanned again, and the data directory is never written.
Without a cache dir (or one that cannot be written) the index lives in this process only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from xmodal.data.carve import Carve
from xmodal.data.remote import is_remote, open_remote, remote_identity
from xmodal.data.shards import ShardError, is_pipe, iter_shard, scan_tar
from xmodal.files import write_json_atomic

log = logging.getLogger(__name__)

INDEX_VERSION = 1
INDEX_KIND = "xmodal-shard-index"
_memo: dict[str, dict[str, ShardCounts]] = {}


@dataclass
class ShardCounts:
    """What a scan of one shard found."""

    url: str
    samples: int
    carved: dict[str, int] | None = None
    """Samples per carved split (train/val/test), when the scan carved."""
    kinds: dict[str, int] = field(default_factory=dict)
    """Members per extension, read or not (``npy``, ``seg.png``, ...)."""
    dotted: int = 0
    """Samples that look like several samples with dotted keys read as one."""
    error: str | None = None
    """Why the shard could not be read to its end (``samples`` counts what was readable)."""


def shard_identity(url: str) -> list[Any]:
    """(path, size, mtime_ns) of a shard: a change of any makes a new index."""
    if is_pipe(url):
        return [url, None, None]  # a command's output has no size or mtime to compare
    if is_remote(url):
        return remote_identity(url)
    stat = os.stat(url)
    return [os.path.abspath(url), stat.st_size, stat.st_mtime_ns]


def scan_shard(url: str, carve: Carve | None = None, allow_pipe: bool = False) -> ShardCounts:
    """Count one shard's samples (and carve them); an unreadable part is recorded, not raised."""
    if is_pipe(url):
        keys, kinds, error = [], Counter(), None
        try:
            for sample in iter_shard(url, allow_pipe):
                keys.append(sample["__key__"])
                kinds.update(k for k in sample if not k.startswith("__"))
        except (ShardError, OSError) as err:
            error = str(err)
        dotted = 0
    else:
        # A remote shard is one streamed read (no seeks); a missing one counts as unreadable.
        try:
            source = open_remote(url) if is_remote(url) else url
        except ShardError as err:
            return ShardCounts(url, 0, None, {}, 0, str(err))
        try:
            scan = scan_tar(source)
        finally:
            if source is not url:
                source.close()
        keys, kinds, error, dotted = scan.keys, scan.kinds, scan.error, scan.dotted
    carved = carve.counts(keys) if carve is not None and carve.active else None
    return ShardCounts(url, len(keys), carved, dict(kinds), dotted, error)


def index_path(cache_dir: str | os.PathLike[str], identity: list[Any]) -> Path:
    digest = hashlib.sha256(json.dumps(identity).encode("utf-8")).hexdigest()[:24]
    return Path(cache_dir) / f"{digest}.json"


def index_shards(
    urls: list[str],
    carve: Carve | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_pipe: bool = False,
) -> dict[str, ShardCounts]:
    """Counts of every shard in ``urls``: from the cache when the shards are unchanged, else scanned
    (and cached). ``carve`` adds per-split counts."""
    if not urls:
        return {}
    piped = [url for url in urls if is_pipe(url)]
    if piped and not allow_pipe:  # counting a pipe: shard runs its command
        raise ShardError(
            f"{piped[0]}: a pipe: shard runs a shell command; refused unless data.allow_pipe=true"
        )
    fractions = [carve.val, carve.test] if carve is not None and carve.active else None
    identity = [INDEX_VERSION, fractions, [shard_identity(url) for url in sorted(urls)]]
    digest = index_path("", identity).name
    if digest in _memo:
        return _as_asked(_memo[digest], urls)
    path = index_path(cache_dir, identity) if cache_dir is not None else None
    counts = _load(path, identity) if path is not None else None
    if counts is None:
        log.info("indexing %d shard(s) (one scan of tar headers; cached)", len(urls))
        counts = {url: scan_shard(url, carve, allow_pipe) for url in sorted(urls)}
        if path is not None:
            _store(path, identity, counts)
    _memo[digest] = counts
    return _as_asked(counts, urls)


def _as_asked(counts: dict[str, ShardCounts], urls: list[str]) -> dict[str, ShardCounts]:
    """The counts keyed by ``urls`` as given: an index made for ``photos/a.tar`` (relative, say, in
    validation) serves ``/abs/photos/a.tar`` (the run's absolute path), as its identity is the same."""
    if all(url in counts for url in urls):
        return counts
    by_path = {_local_key(c.url): c for c in counts.values()}
    return {url: replace(by_path[_local_key(url)], url=url) for url in sorted(urls)}


def _local_key(url: str) -> str:
    return url if is_pipe(url) or is_remote(url) else os.path.abspath(url)


def _load(path: Path, identity: list[Any]) -> dict[str, ShardCounts] | None:
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("identity") != identity:
            return None
        return {entry["url"]: ShardCounts(**entry) for entry in stored["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or unreadable: scan again


def _store(path: Path, identity: list[Any], counts: dict[str, ShardCounts]) -> None:
    payload = {
        "kind": INDEX_KIND,
        "identity": identity,
        "shards": [asdict(c) for c in counts.values()],
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, payload)
    except OSError as error:  # a read-only cache only costs a rescan next time
        log.warning("could not cache the shard index in %s (%s); it is kept in memory", path.parent, error)


def sizes_of_source(
    spec: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """xmodal's ``sizes.json`` form of any source, counts scanned (or stated): what
    ``xmodal-shards index --sizes`` writes, and what :func:`xmodal.data.shards.read_sizes` returns
    for a directory of plain tars."""
    from xmodal.data.resolve import resolve_source  # resolve imports shards, which imports this lazily

    source = resolve_source(spec)
    counts = index_shards([u for u in source.urls() if not is_pipe(u)], None, cache_dir)
    root = Path(os.fspath(spec))
    splits: dict[str, dict[str, int]] = {}
    for split, urls in source.splits.items():
        # Names relative to a directory source; absolute for a pattern, list or index file.
        splits[split] = {
            url
            if is_pipe(url) or is_remote(url)
            else os.path.relpath(url, root)
            if root.is_dir()
            else os.path.abspath(url): source.stated[url] if is_pipe(url) else counts[url].samples
            for url in urls
        }
    kinds = Counter[str]()
    for c in counts.values():
        kinds.update(c.kinds)
    return {
        **source.info,  # what an existing sizes.json says besides counts (spec, modalities, ...)
        "source": source.info.get("source", {"format": source.kind}),
        "splits": splits,
        "shard_dirs": dict.fromkeys(splits, ""),
        "members": dict(sorted(kinds.items())),
    }
