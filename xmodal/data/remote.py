"""Shards that are not local files: ``http(s)://``, ``s3://``, ``gs://`` through fsspec, and the
opt-in ``pipe:`` command.

A remote shard is streamed once from its start (no seeks, no local copy), with a connect/read
timeout and a few retries of the *open* only: a connection that breaks mid-shard ends that shard
with a ``ShardError`` (counted, its remaining records become padding, as for a truncated local
tar), since retrying there would hand the stream samples it already had. ``s3://`` needs the
``s3fs`` extra and ``gs://`` ``gcsfs`` (``pip install 'xmodal[remote]'``); endpoints and
credentials come from the usual environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).
"""

from __future__ import annotations

import io
import posixpath
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlparse, urlunparse

from xmodal.data.shards import PIPE_PREFIX, ShardError, iter_tar_samples

REMOTE_SCHEMES = ("http://", "https://", "s3://", "gs://", "gcs://")
_EXTRA = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}
_DRAIN_CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteOptions:
    """How remote shards are opened: seconds to connect / between reads, and retries of the open."""

    timeout_s: float = 60.0
    retries: int = 3
    backoff_s: float = 1.0


def is_remote(url: object) -> bool:
    return isinstance(url, str) and url.lower().startswith(REMOTE_SCHEMES)


def _storage_options(url: str, options: RemoteOptions) -> dict[str, Any]:
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("http", "https"):
        import aiohttp

        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=options.timeout_s, sock_read=options.timeout_s
        )
        # block_size 0: a plain streaming GET, so servers without range requests work too.
        return {"block_size": 0, "client_kwargs": {"timeout": timeout}}
    if scheme == "s3":
        return {
            "config_kwargs": {"connect_timeout": options.timeout_s, "read_timeout": options.timeout_s},
            "default_block_size": 8 << 20,
        }
    return {}


def open_remote(
    url: str,
    options: RemoteOptions | None = None,
    sleep: Callable[[float], None] = time.sleep,
    what: str = "shard",
) -> IO[bytes]:
    """A buffered binary stream of ``url``; retried ``options.retries`` times with a growing pause.

    Raises ``ShardError`` naming the url (and ``what`` it is: a shard, a list file): a missing
    object at once, anything else once the retries are spent. A missing fsspec back-end names the
    extra to install.
    """
    import fsspec

    options = options or RemoteOptions()
    scheme = url.split("://", 1)[0].lower()
    for attempt in range(options.retries + 1):
        try:
            opened = fsspec.open(url, "rb", **_storage_options(url, options)).open()
            return opened if hasattr(opened, "peek") else io.BufferedReader(opened, buffer_size=1 << 20)
        except ImportError as error:
            extra = _EXTRA.get(scheme, "the fsspec back-end")
            raise ShardError(
                f"{url}: reading {scheme}:// needs {extra} (pip install {extra}): {error}"
            ) from None
        except FileNotFoundError:
            # fsspec's HTTP back-end reports any failed request (a 503 too) as not found, so for
            # http(s) it is retried like other errors; S3/GCS say "not found" only when it is.
            if scheme not in ("http", "https"):
                raise ShardError(f"{url}: no such remote {what}") from None
            if attempt == options.retries:
                raise ShardError(
                    f"{url}: no such remote {what} (or the server failed {attempt + 1} attempts)"
                ) from None
        except Exception as error:  # OSError, timeouts, and aiohttp/botocore errors (not OSErrors)
            if attempt == options.retries:
                raise ShardError(
                    f"{url}: cannot open after {attempt + 1} attempts ({type(error).__name__}: {error})"
                ) from None
        sleep(options.backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def iter_remote_samples(url: str, options: RemoteOptions | None = None) -> Iterator[dict[str, bytes | str]]:
    """Samples of a remote tar shard (``__shard__`` is the url); read errors become ``ShardError``."""
    stream = open_remote(url, options)
    try:
        for sample in iter_tar_samples(stream):
            sample["__shard__"] = url
            yield sample
    except ShardError as error:
        raise ShardError(str(error).replace(str(getattr(stream, "name", "<stream>")), url, 1)) from None
    except Exception as error:  # a connection dropped mid-shard: aiohttp/botocore errors
        raise ShardError(f"{url}: read failed mid-shard ({type(error).__name__}: {error})") from None
    finally:
        stream.close()


def iter_pipe_samples(url: str) -> Iterator[dict[str, bytes | str]]:
    """Samples of a ``pipe:CMD`` shard (the caller has checked that pipes are allowed).

    The tar reader stops at the end-of-archive block, before the command has written its last
    bytes (the zero padding up to a 10 KB record, or whatever follows): closing the pipe there
    would kill a healthy ``cat`` with SIGPIPE (status 141). So after the archive the rest of the
    output is read and dropped, and the command's status is judged only when it ran to its end;
    a consumer that stops early closes the pipe and the status is then not an error.
    """
    command = url[len(PIPE_PREFIX) :]
    proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, bufsize=1 << 20)
    assert proc.stdout is not None
    finished = False
    try:
        for sample in iter_tar_samples(proc.stdout):  # type: ignore[arg-type]
            sample["__shard__"] = url
            yield sample
        while proc.stdout.read(_DRAIN_CHUNK):
            pass
        finished = True
    finally:
        proc.stdout.close()
        code = proc.wait()
    if finished and code != 0:
        raise ShardError(f"{url}: command exited with status {code}")


def _filesystem(url: str) -> tuple[Any, str]:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url, **_listing_options(url))
    except ImportError as error:
        scheme = url.split("://", 1)[0].lower()
        extra = _EXTRA.get(scheme, "the fsspec back-end")
        raise ShardError(f"{url}: reading {scheme}:// needs {extra} (pip install {extra}): {error}") from None
    return fs, path


def _listing_options(url: str) -> dict[str, Any]:
    options = _storage_options(url, RemoteOptions())
    options.pop("block_size", None)
    options.pop("default_block_size", None)
    return options


def remote_identity(url: str) -> list[Any]:
    """(url, size, version tag) of a remote shard for the index cache: a changed object re-indexes.
    Unknown parts are None (the index then trusts the url alone)."""
    try:
        fs, path = _filesystem(url)
        info = fs.info(path)
    except Exception:  # no HEAD support, no permission to stat: the url is the identity
        return [url, None, None]
    tag = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime")
    return [url, info.get("size"), str(tag) if tag is not None else None]


def list_remote_tars(url: str) -> tuple[list[str], bool]:
    """Every ``.tar``/``.tar.gz``/``.tgz`` below a bucket prefix (sorted urls), and whether the prefix
    holds a ``sizes.json``. Listing needs an object store (s3://, gs://): an http(s) server has no
    listing, so it is asked for a pattern, a list file or a wids index instead."""
    from xmodal.data.shards import SIZES_FILE, is_tar_name

    scheme = url.split("://", 1)[0].lower()
    if scheme in ("http", "https"):
        raise ShardError(
            f"{url}: an http(s) server cannot be listed: name the shards with a brace pattern "
            "(https://host/shards-{000000..000099}.tar), a list file or a wids index"
        )
    fs, root = _filesystem(url)
    try:
        found = fs.find(root.rstrip("/"))
    except Exception as error:
        raise ShardError(f"{url}: cannot list ({type(error).__name__}: {error})") from None
    prefix = url.split("://", 1)[0] + "://"
    tars = sorted(prefix + p for p in found if is_tar_name(p.rsplit("/", 1)[-1]))
    has_sizes = any(
        p.rstrip("/").endswith("/" + SIZES_FILE) and p.count("/") == root.rstrip("/").count("/") + 1
        for p in found
    )
    return tars, has_sizes


def read_remote_text(url: str, options: RemoteOptions | None = None, what: str = "file") -> str:
    """A remote text file (a list, an index), opened with the shards' timeout and retries; a read
    that breaks off or bytes that are not UTF-8 are a ``ShardError`` naming the url."""
    stream = open_remote(url, options, what=what)
    try:
        data = stream.read()
    except Exception as error:  # a dropped connection: aiohttp/botocore errors, not OSErrors
        raise ShardError(f"{url}: read failed ({type(error).__name__}: {error})") from None
    finally:
        stream.close()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ShardError(f"{url}: not a UTF-8 text file ({error})") from None


def is_remote_file(url: str) -> bool:
    """Whether a remote url that is not a tar names one file (a list, a wids index, a
    ``sizes.json``) rather than a prefix to list. An http(s) server cannot be listed, so there
    any url not ending in ``/`` is a file; an object store is asked (one HEAD)."""
    if url.endswith("/"):
        return False
    if url.split("://", 1)[0].lower() in ("http", "https"):
        return True
    fs, path = _filesystem(url)
    try:
        return bool(fs.isfile(path))
    except Exception:  # no permission to stat, say: listing it says what is wrong
        return False


def url_dir(url: str) -> str:
    """The folder of a url (``s3://b/x/list.txt`` → ``s3://b/x``), what its relative entries join."""
    parsed = urlparse(url)
    return parsed._replace(path=posixpath.dirname(parsed.path), query="", fragment="").geturl()


def join_url(base: str, entry: str) -> str:
    """``entry`` read from a file at folder ``base``, merged as webdataset's wids merges urls: an
    entry with a scheme stands alone, an absolute path keeps the base's scheme and host, a relative
    one joins the base's path (``..`` resolved). ``urljoin`` would not do: it drops a relative
    entry of an ``s3://`` base, whose scheme it does not know."""
    if "://" in entry:
        return entry
    parsed, rel = urlparse(base), urlparse(entry)
    path = (
        rel.path
        if rel.path.startswith("/")
        else posixpath.normpath(posixpath.join(parsed.path or "/", rel.path))
    )
    return urlunparse((parsed.scheme, parsed.netloc, path, "", rel.query, ""))
