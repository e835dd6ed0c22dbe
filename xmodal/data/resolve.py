"""Where a run's shards are: one resolver for every form of local source a user brings.

``resolve_source(spec)`` turns what ``data.shards`` (or ``data.val_shards`` ...) names into shard
files per split, plus the sample counts the source states, if any:

- a directory with xmodal's ``sizes.json`` (its splits and counts);
- img2dataset output (``NNNNN.tar`` + ``NNNNN_stats.json``: one ``train`` split, counts from stats);
- a directory with split folders (``train/``, ``val/`` or ``valid/`` or ``validation/``, ``test/``,
  any other folder is a split of its name): every tar below each folder, at any depth;
- any other directory: every ``.tar``/``.tar.gz``/``.tgz`` below it, at any depth, as ``train``
  (webdataset's ``ShardWriter`` output, say);
- a brace pattern (``shards-{000000..000099}.tar``) or a glob (``shards/*.tar``);
- a list file (one shard per line, ``#`` comments; relative paths from the list's folder);
- a webdataset ``wids`` shard index (``{"__kind__": "wids-shard-index-v1", "shardlist": [...]}``);
- one tar file.

Remote sources (xmodal/data/remote.py): one ``http(s)://``, ``s3://`` or ``gs://`` tar, a remote
brace pattern, a bucket prefix (listed: its split folders, its ``sizes.json``), or a remote list
file, wids index or ``sizes.json`` (fetched with the shards' timeouts and retries; relative entries
resolve against the file's own url, as webdataset's wids does). Local list files and wids indexes
may name remote shards too. A ``pipe:CMD`` source is one train shard (run only with
``data.allow_pipe=true``); a remote list or index may not name one (it would run a command the
server chose).

Shards are sorted by path, so the list is the same on every rank. Counts not stated come from
``xmodal.data.index`` (a scan, cached).
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from xmodal.data.remote import (
    is_remote,
    is_remote_file,
    join_url,
    list_remote_tars,
    read_remote_text,
    url_dir,
)
from xmodal.data.shards import (
    _HOW_TO_CREATE,
    SIZES_FILE,
    ShardError,
    img2dataset_sizes,
    is_pipe,
    is_tar_name,
    read_sizes,
    split_shard_sizes,
)

SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val"}
SPLIT_FOLDERS |= {"dev": "val", "test": "test", "testing": "test"}
"""Folder names read as the standard splits (any other folder with tars is a split of its name)."""
WIDS_KIND = "wids-shard-index-v1"
_BRACE = re.compile(r"\{([^{}]*)\}")
_HOW = "point data.shards at a directory of .tar shards, a brace pattern, a list file or a wids index"


@dataclass(frozen=True)
class Source:
    """A resolved source: shard urls per split and the counts the source itself states."""

    spec: str
    kind: str
    """sizes.json | img2dataset | split folders | tars | pattern | list | wids | tar | pipe, or
    remote tar | remote pattern | remote list | remote wids | remote sizes.json | remote split
    folders | remote tars."""
    splits: dict[str, tuple[str, ...]]
    stated: dict[str, int] = field(default_factory=dict)
    """Samples per shard url as the source states them (sizes.json, img2dataset stats, wids)."""
    info: dict[str, Any] = field(default_factory=dict)
    """What a ``sizes.json`` says besides counts (modalities, spec, skipped, incomplete)."""

    @property
    def has_own_splits(self) -> bool:
        """Whether the splits come from the data (folders, an index) rather than "all is train"."""
        return self.kind in ("sizes.json", "split folders", "remote sizes.json", "remote split folders")

    def urls(self) -> list[str]:
        return sorted({url for urls in self.splits.values() for url in urls})


def dataset_name(spec: str | os.PathLike[str]) -> str:
    """A readable name of the data a source holds: its directory's name, or the nearest parent's
    for a file or pattern (``/data/laion/{00000..00099}.tar`` → ``laion``)."""
    path = Path(os.fspath(spec)).expanduser()
    if path.is_dir():
        return path.resolve().name or "data"
    for parent in path.parents:
        if not any(c in parent.name for c in "{}*?[]"):
            resolved = parent.resolve() if str(parent) not in ("", ".") else Path.cwd()
            return resolved.name or "data"
    return "data"


def resolve_source(spec: str | os.PathLike[str]) -> Source:
    """The shards of a local source (module docstring); ValueError/FileNotFoundError name the fault."""
    text = os.fspath(spec)
    if is_pipe(text):
        return Source(text, "pipe", {"train": (text,)})
    if is_remote(text):
        return _remote(text)
    if "://" in text:
        raise ShardError(f"{text}: unknown url scheme (read: http(s)://, s3://, gs://, pipe:, local paths)")
    path = Path(text).expanduser()
    if path.is_dir():
        return _directory(text, path)
    if path.is_file():
        if path.name == SIZES_FILE:
            return _directory(text, path.parent)
        if is_tar_name(path.name):
            return Source(text, "tar", {"train": (str(path),)})
        if path.suffix.lower() == ".json":
            return _wids(text, path)
        return _list_file(text, path)
    if _BRACE.search(text) or any(c in text for c in "*?["):
        urls = _expand(text)
        return Source(text, "pattern", {"train": tuple(urls)})
    raise FileNotFoundError(f"{text}: no such file or directory; {_HOW}")


def _remote(spec: str) -> Source:
    if _BRACE.search(spec):
        return Source(spec, "remote pattern", {"train": tuple(sorted(dict.fromkeys(expand_braces(spec))))})
    name = spec.rsplit("/", 1)[-1]
    if is_tar_name(name):
        return Source(spec, "remote tar", {"train": (spec,)})
    if is_remote_file(spec):
        try:
            text = read_remote_text(spec, what="file")
        except ShardError as error:
            if "." in name:
                raise
            # ``https://host/data``: meant as a folder, which an http(s) server cannot list.
            raise ShardError(
                f"{error}; a folder cannot be listed over http(s): name the shards with a brace "
                "pattern, a list file or a wids index"
            ) from None
        if name == SIZES_FILE:
            return _remote_sizes(spec, url_dir(spec), text)
        if name.lower().endswith(".json"):
            return _wids_index(spec, text, url_dir(spec), remote=True)
        return _list_text(spec, text, lambda entry: _remote_entry(spec, entry), spec, "remote list")
    root = spec.rstrip("/")
    tars, has_sizes = list_remote_tars(root)
    if has_sizes:
        return _remote_sizes(spec, root, read_remote_text(f"{root}/{SIZES_FILE}"))
    if not tars:
        raise FileNotFoundError(f"{spec}: no .tar shards below this prefix")
    by_folder: dict[str, list[str]] = {}
    for url in tars:
        parts = url[len(root) + 1 :].split("/")
        by_folder.setdefault(SPLIT_FOLDERS.get(parts[0], "") if len(parts) > 1 else "", []).append(url)
    if set(by_folder) - {""}:
        if "" in by_folder:
            raise ValueError(f"{spec} has split folders and tars outside them: move them into a split folder")
        return Source(spec, "remote split folders", {k: tuple(v) for k, v in by_folder.items()})
    return Source(spec, "remote tars", {"train": tuple(tars)})


def _remote_sizes(spec: str, root: str, text: str) -> Source:
    try:
        sizes = json.loads(text)
        entries_of = {split: dict(entries) for split, entries in sizes["splits"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{root}/{SIZES_FILE}: not xmodal's sizes.json ({error}); {_HOW}") from None
    splits = {
        split: tuple(sorted(join_url(root, n) for n in entries)) for split, entries in entries_of.items()
    }
    stated = {join_url(root, n): c for entries in entries_of.values() for n, c in entries.items()}
    return Source(spec, "remote sizes.json", splits, stated)


def _remote_entry(list_url: str, entry: str) -> list[str]:
    """The shard urls one entry of a remote list names: relative to the list's own url, braces
    expanded (a glob cannot be: an http(s) server has no listing)."""
    if is_pipe(entry):
        raise ValueError(f"{list_url}: a remote list may not name pipe: shards (got {entry!r})")
    url = join_url(url_dir(list_url), entry)
    if any(c in urlparse(url).path for c in "*?["):  # a presigned url's "?query" is no glob
        raise ValueError(f"{list_url}: {entry!r} is a glob; a remote list names shards or brace patterns")
    return expand_braces(url)


def _directory(spec: str, root: Path) -> Source:
    if (root / SIZES_FILE).is_file():
        return _from_sizes(spec, root, read_sizes(root), "sizes.json")
    if any(root.glob("*_stats.json")):
        return _from_sizes(spec, root, img2dataset_sizes(root), "img2dataset")
    tars = _tars_below(root)
    if not tars:
        raise FileNotFoundError(
            f"{root} holds no .tar shards and no {SIZES_FILE}: {_HOW}; or {_HOW_TO_CREATE}"
        )
    folders = {p.name for p in root.iterdir() if p.is_dir()}
    if not folders & set(SPLIT_FOLDERS):
        return Source(spec, "tars", {"train": tuple(tars)})
    splits: dict[str, list[str]] = {}
    loose = []
    for tar in tars:
        top = Path(tar).relative_to(root).parts[0]
        if top == Path(tar).name:
            loose.append(tar)
            continue
        splits.setdefault(SPLIT_FOLDERS.get(top, top), []).append(tar)
    if loose:
        raise ValueError(
            f"{root} has split folders ({', '.join(sorted(folders & set(SPLIT_FOLDERS)))}) and tars outside "
            f"them ({Path(loose[0]).name}{' ...' if len(loose) > 1 else ''}): move them into a split folder"
        )
    return Source(spec, "split folders", {split: tuple(urls) for split, urls in splits.items()})


def _tars_below(root: Path) -> list[str]:
    # Hidden folders hold caches and partial copies, not shards.
    return sorted(
        str(p)
        for p in root.rglob("*")
        if is_tar_name(p.name)
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _from_sizes(spec: str, root: Path, sizes: dict[str, Any], kind: str) -> Source:
    splits: dict[str, tuple[str, ...]] = {}
    stated: dict[str, int] = {}
    for split, entries in sizes["splits"].items():
        if kind == "img2dataset":
            folder = root / sizes.get("shard_dirs", {}).get(split, split)
            pairs = sorted((str(folder / name), n) for name, n in entries.items())
        else:
            pairs = split_shard_sizes(root, split)
        splits[split] = tuple(url for url, _ in pairs)
        stated.update(pairs)
    info = {k: v for k, v in sizes.items() if k not in ("splits", "shard_dirs")}
    return Source(spec, kind, splits, stated, info)


def _list_file(spec: str, path: Path) -> Source:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a text list of shards ({error}); {_HOW}") from error

    def local(entry: str) -> list[str]:
        if is_remote(entry) or is_pipe(entry):
            return [entry]
        full = entry if Path(entry).is_absolute() else str(path.parent / entry)
        return _expand(full) if (_BRACE.search(full) or any(c in full for c in "*?[")) else [full]

    return _list_text(spec, text, local, str(path), "list")


def _list_text(spec: str, text: str, entry_urls: Callable[[str], list[str]], where: str, kind: str) -> Source:
    """A list file's shards: one entry a line (``#`` comments), each expanded by ``entry_urls``."""
    if text.lstrip().startswith("<"):  # a server's error or folder page, not a list
        raise ValueError(f"{where}: an HTML page, not a list of shards (one url a line); {_HOW}")
    urls: list[str] = []
    for line in text.splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            urls += entry_urls(entry)
    _check_exist(urls, where)
    if not urls:
        raise ValueError(f"{where} lists no shards")
    return Source(spec, kind, {"train": tuple(urls)})


def _wids(spec: str, path: Path) -> Source:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from error
    return _wids_index(spec, text, str(path.parent), remote=False)


def _wids_index(spec: str, text: str, folder: str, remote: bool) -> Source:
    """A wids shard index read from ``text``; relative urls from the index's own ``folder`` (a
    local path or a url), or from its ``"base"`` (itself relative to that folder), as wids does."""
    where = spec
    try:
        index = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON ({error})") from error
    if not isinstance(index, dict) or not isinstance(index.get("shardlist"), list):
        raise ValueError(f'{where}: not a wids shard index (no "shardlist"); {_HOW}')
    base = str(index.get("base", ""))
    stated: dict[str, int] = {}
    urls = []
    for number, entry in enumerate(index["shardlist"]):
        url = entry.get("url") if isinstance(entry, dict) else None
        if not isinstance(url, str):
            raise ValueError(f'{where}: shardlist[{number}] has no "url"')
        if remote:
            if is_pipe(url):
                raise ValueError(f"{where}: a remote index may not name pipe: shards (got {url!r})")
            full = join_url(join_url(folder, base) if base else folder, url)
        else:
            local = not (is_remote(url) or is_pipe(url) or Path(url).is_absolute())
            full = str(Path(folder) / base / url) if local else url
        urls.append(full)
        n = entry.get("nsamples")
        if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
            stated[full] = n
    _check_exist(urls, where)
    kind = "remote wids" if remote else "wids"
    return Source(spec, kind, {"train": tuple(sorted(urls))}, stated, {"name": index.get("name")})


def expand_braces(pattern: str) -> list[str]:
    """webdataset's (braceexpand's) forms: ``{000..099}`` keeps the zero padding, ``{a,b}``
    alternates; several groups multiply out, left to right."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") or len(first) == len(last) else 0
        step = 1 if int(last) >= int(first) else -1
        options = [str(i).zfill(width) for i in range(int(first), int(last) + step, step)]
    else:
        options = body.split(",")
    return [head + option + rest for option in options for rest in expand_braces(tail)]


def _expand(pattern: str) -> list[str]:
    urls: list[str] = []
    for expanded in expand_braces(pattern):
        if any(c in expanded for c in "*?["):
            found = sorted(
                p for p in glob.glob(os.path.expanduser(expanded), recursive=True) if is_tar_name(p)
            )
            if not found:
                raise FileNotFoundError(f"{expanded}: matches no .tar shard")
            urls += found
        else:
            urls.append(os.path.expanduser(expanded))
    _check_exist(urls, pattern)
    return sorted(dict.fromkeys(urls))


def _check_exist(urls: list[str], where: str) -> None:
    missing = [url for url in urls if not (is_remote(url) or is_pipe(url) or Path(url).is_file())]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{where}: shard {missing[0]} does not exist{more} ({len(urls)} listed)")
