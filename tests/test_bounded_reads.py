"""Bounded reads (issue 16): lying tar headers, a gzip bomb and deeply nested JSON are counted skips
naming shard and member, never MemoryError / OverflowError / RecursionError; the FID classifier
says what it is doing. Shards are written with Python's ``tarfile`` and ``gzip``, as outside tools
write them, then broken by hand where a fault needs it."""

from __future__ import annotations

import gzip
import io
import logging
import tarfile
import tracemalloc
from pathlib import Path

import pytest
import torch

from xmodal.codecs.json_meta import load_json_member
from xmodal.data import shards
from xmodal.data.epoch_plan import ShardInfo, Topology
from xmodal.data.shards import DataFailure, ShardError, iter_tar_samples, scan_tar
from xmodal.data.stream import ShardStream

LIMIT_MSG = "bytes, over the {limit}-byte limit per member (data.max_member_bytes; raise it if such members are expected)"
DEEP = b"[" * 5000 + b"]" * 5000


@pytest.fixture(autouse=True)
def restore_member_limit(monkeypatch):
    """Tests below set the process-wide limit (as the factory and the CLI do): put it back."""
    monkeypatch.setattr(shards, "_max_member_bytes", shards.max_member_bytes())
    monkeypatch.delenv(shards.MAX_MEMBER_ENV, raising=False)


def tar_bytes(members: list[tuple[str, bytes]], pax: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    fmt = tarfile.PAX_FORMAT if pax else tarfile.USTAR_FORMAT
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if pax:
                info.pax_headers = pax
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def with_size_field(raw: bytes, field: bytes) -> bytes:
    """The tar with its first header's size field replaced (checksum recomputed: only the size lies)."""
    header = bytearray(raw[:512])
    header[124:136] = field
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + raw[512:]


SAMPLES = [("k0.txt", b"a red circle"), ("k1.txt", b"a blue square")]
FAULTS = {
    # base-256 (GNU) size of 100 GB: read whole it was a MemoryError
    "header 100 GB": (
        with_size_field(tar_bytes(SAMPLES), b"\x80" + (100 * 10**9).to_bytes(11, "big")),
        "claims",
    ),
    # PAX size record of 10**30: read whole it was an OverflowError
    "PAX 10**30": (tar_bytes(SAMPLES[:1], pax={"size": str(10**30)}) + tar_bytes(SAMPLES[1:]), "claims"),
    # a signed octal size would seek backwards, for ever
    "negative size": (with_size_field(tar_bytes(SAMPLES), b"-0000000001\0"), "invalid"),
    "garbage size": (with_size_field(tar_bytes(SAMPLES), b"zzzzzzzzzzz\0"), "invalid"),
    "base-256 negative": (with_size_field(tar_bytes(SAMPLES), b"\xff" * 12), "invalid"),
}
EXPECTED = {
    "header 100 GB": "member 'k0.txt' claims 100000000000 " + LIMIT_MSG.format(limit=1 << 20),
    "PAX 10**30": f"member 'k0.txt' claims {10**30} " + LIMIT_MSG.format(limit=1 << 20),
    "negative size": "unreadable tar (member 'k0.txt' has an invalid size field b'-0000000001\\x00')",
    "garbage size": "unreadable tar (member 'k0.txt' has an invalid size field b'zzzzzzzzzzz\\x00')",
    "base-256 negative": "unreadable tar (member 'k0.txt' has an invalid size field "
    + repr(b"\xff" * 12)
    + ")",
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_lying_size_is_a_shard_error_naming_shard_and_member(fault, tmp_path):
    raw, _ = FAULTS[fault]
    path = tmp_path / "bad.tar"
    path.write_bytes(raw)
    with pytest.raises(ShardError) as error:
        list(iter_tar_samples(path, max_member_bytes=1 << 20))
    assert str(error.value) == f"{path}: {EXPECTED[fault]}"
    # Unseekable (a remote or pipe stream): the same refusal, before anything is allocated.
    with pytest.raises(ShardError) as error:
        list(iter_tar_samples(io.BufferedReader(io.BytesIO(raw)), max_member_bytes=1 << 20))
    assert str(error.value) == f"<stream>: {EXPECTED[fault]}"
    # A scan (index, inspect) seeks over members: it records why the shard ends there.
    scan = scan_tar(path)
    assert scan.keys == [] and f"{path}: " in scan.error and "'k0.txt'" in scan.error


def test_members_up_to_the_limit_are_read_and_one_above_is_refused(tmp_path):
    path = tmp_path / "s.tar"
    path.write_bytes(tar_bytes([("a.txt", b"x" * 100), ("b.txt", b"y" * 101)]))
    with pytest.raises(ShardError, match="member 'b.txt' claims 101 bytes, over the 100-byte limit"):
        for sample in iter_tar_samples(path, max_member_bytes=100):
            assert sample == {"__key__": "a", "__shard__": str(path), "txt": b"x" * 100}
    assert [s["txt"] for s in iter_tar_samples(path, max_member_bytes=101)] == [b"x" * 100, b"y" * 101]


def gzip_bomb(path: Path, member_bytes: int) -> Path:
    """A ~1 MB .tar.gz whose tar holds one ``member_bytes`` caption after a good sample: gzip
    members concatenated (each 1 MiB of zeros, ~1 KB compressed) inflate as one stream."""
    head = tar_bytes([("ok.txt", b"fine")])[:1024]  # header + one block of data, no end-of-archive
    info = tarfile.TarInfo("bomb.txt")
    info.size = member_bytes
    zeros = gzip.compress(b"\0" * (1 << 20), compresslevel=9)
    with open(path, "wb") as out:
        out.write(gzip.compress(head + info.tobuf(format=tarfile.USTAR_FORMAT)))
        for _ in range(member_bytes >> 20):
            out.write(zeros)
    return path


def test_a_gzip_bomb_is_refused_at_its_header_with_bounded_memory(tmp_path):
    bomb = gzip_bomb(tmp_path / "bomb.tar.gz", 1 << 30)
    assert bomb.stat().st_size < 2 << 20  # 1 GiB inflated
    tracemalloc.start()
    try:
        read = []
        with pytest.raises(ShardError) as error:
            for sample in iter_tar_samples(bomb):  # the default limit: 64 MiB
                read.append(sample["txt"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert read == [b"fine"]  # the sample before the refused member is complete: handed out
    assert str(error.value) == f"{bomb}: member 'bomb.txt' claims {1 << 30} " + LIMIT_MSG.format(
        limit=64 << 20
    )
    assert peak < 8 << 20  # was the whole 1 GiB (1.27 GB RSS in `xmodal-shards plan`)
    # Inflated member by member: a member under the limit still reads, and in full.
    small = gzip_bomb(tmp_path / "small.tar.gz", 2 << 20)
    assert [len(s["txt"]) for s in iter_tar_samples(small)] == [4, 2 << 20]


def test_a_corrupt_deflate_stream_is_a_shard_error(tmp_path):
    raw = bytearray(gzip.compress(tar_bytes(SAMPLES)))
    raw[20:40] = b"\xff" * 20  # a bad deflate block: zlib.error, which is no OSError
    path = tmp_path / "corrupt.tar.gz"
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=f"^{path}: unreadable tar"):
        list(iter_tar_samples(path))


def _stream(shard_list: list[tuple[Path, int]], decode=None, failures: int = 100) -> ShardStream:
    infos = [ShardInfo(str(path), n) for path, n in shard_list]
    return ShardStream(
        infos, "exact", 0, Topology(0, 1, 0), 4, decode, shuffle_buffer=1, max_consecutive_failures=failures
    )


def test_an_oversized_member_is_a_counted_skip_in_the_stream(tmp_path, caplog):
    good, bad = tmp_path / "a.tar", tmp_path / "b.tar"
    good.write_bytes(tar_bytes([(f"g{i}.txt", b"fine") for i in range(4)]))
    bad.write_bytes(tar_bytes([(f"b{i}.txt", b"x" * (5000 if i == 2 else 4)) for i in range(4)]))
    shards.set_max_member_bytes(4096)  # what the factory does with data.max_member_bytes
    stream = _stream([(good, 4), (bad, 4)])
    with caplog.at_level(logging.WARNING, logger="xmodal.data.stream"):
        rows = [v for batch in stream.iter_worker(0) for v in batch["valid"]]
    assert len(rows) == 8 and sum(rows) == 6  # b2, b3 unread (the shard ends at the refused member)
    assert stream.skip_counts() == {str(bad): 2} and stream.error_counts() == {str(bad): 1}
    assert [r.getMessage() for r in caplog.records] == [
        f"data error 1 in shard {bad} (sample skipped): {bad}: member 'b2.txt' claims 5000 "
        + LIMIT_MSG.format(limit=4096)
    ]
    with pytest.raises(DataFailure, match=f"the last in shard {bad}: {bad}: member 'b2.txt' claims 5000"):
        list(_stream([(good, 4), (bad, 4)], failures=1).iter_worker(0))


def test_deep_json_is_a_value_error_and_a_counted_decode_skip(tmp_path, caplog):
    with pytest.raises(ValueError) as error:
        load_json_member(DEEP, "s.tar: sample 'k' member 'json'")
    assert (
        str(error.value)
        == "s.tar: sample 'k' member 'json': JSON nested deeper than 64 levels (refused unread)"
    )
    assert load_json_member(b'{"captions": ["[{", "]]"], "a": [[1]]}', "x") == {
        "captions": ["[{", "]]"],
        "a": [[1]],
    }
    with pytest.raises(ValueError, match="^x: not valid JSON"):
        load_json_member(b"{nope", "x")

    from xmodal.modalities.base import SampleContext
    from xmodal.modalities.text import sample_captions

    path = tmp_path / "j.tar"
    path.write_bytes(
        tar_bytes([("k0.json", b'{"captions": ["ok"]}'), ("k1.json", DEEP), ("k2.json", b"[1]")])
    )
    raws = list(iter_tar_samples(path))
    assert sample_captions(raws[0]) == ["ok"]
    with pytest.raises(ValueError, match=f"^{path}: sample 'k1' member 'json': JSON nested deeper"):
        sample_captions(raws[1])
    with pytest.raises(
        ValueError, match=f"^{path}: sample 'k2' member 'json': must be a JSON object, not list"
    ):
        _ = SampleContext("k2", 0, 0, False, raws[2]).meta

    stream = _stream([(path, 3)], decode=lambda raw: {"captions": sample_captions(raw)})
    with caplog.at_level(logging.WARNING, logger="xmodal.data.stream"):
        valid = [v for batch in stream.iter_worker(0) for v in batch["valid"]]
    assert valid == [True, False, False, False]  # the 4th row is the batch's padding
    assert stream.skip_counts() == {str(path): 2}
    assert "sample 'k1' member 'json': JSON nested deeper than 64 levels" in caplog.records[0].getMessage()


def test_the_tokenizer_fit_skips_unreadable_captions_and_counts_them(tmp_path):
    from xmodal.data.datamodule import fit_captions
    from xmodal.data.splits import SplitSettings, resolve_splits

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.tar").write_bytes(
        tar_bytes([("k0.json", b'{"captions": ["red"]}'), ("k1.json", DEEP), ("k2.txt", b"blue")])
    )
    (tmp_path / "train" / "b.tar").write_bytes(tar_bytes([("m0.txt", b"green"), ("m1.txt", b"x" * 20000)]))
    shards.set_max_member_bytes(16384)  # above the deep JSON's 10000 bytes: its depth refuses it
    data = resolve_splits(
        tmp_path, SplitSettings(val_fraction=0, test_fraction=0, index_dir=str(tmp_path / "ix"))
    )
    skipped: list[str] = []
    assert list(fit_captions(data, 100, skipped=skipped)) == ["red", "blue", "green"]  # was a RecursionError
    assert [line.split(": ", 1)[0] for line in skipped] == [
        str(tmp_path / "train" / n) for n in ("a.tar", "b.tar")
    ]
    assert "sample 'k1' member 'json': JSON nested deeper" in skipped[0]
    assert "member 'm1.txt' claims 20000 bytes" in skipped[1]


def test_data_max_member_bytes_is_validated_and_reaches_the_readers(tmp_path):
    from xmodal.config import compose_config
    from xmodal.config.schema import ConfigError
    from xmodal.config.validate import validate
    from xmodal.factory import build_datamodule

    assert compose_config([]).data.max_member_bytes == shards.DEFAULT_MAX_MEMBER_BYTES == 64 << 20
    with pytest.raises(ConfigError, match=r"data\.max_member_bytes: must be >= 1 \(bytes\)"):
        validate(compose_config(["data.max_member_bytes=0"]))
    build_datamodule(compose_config(["data.max_member_bytes=4096"]), tmp_path)
    assert shards.max_member_bytes() == 4096
    import os

    assert os.environ[shards.MAX_MEMBER_ENV] == "4096"  # spawned loader workers read it


def test_plan_and_inspect_report_an_oversized_member_in_one_line(tmp_path, capsys, caplog):
    from xmodal.data.cli import main

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.tar").write_bytes(tar_bytes([("k0.txt", b"ok"), ("k1.txt", b"x" * 5000)]))
    common = ["--max-member-bytes", "4096", "--cache-dir", str(tmp_path / "ix"), "--val-fraction", "0"]
    common += ["--test-fraction", "0"]
    with caplog.at_level(logging.WARNING, logger="xmodal.data.stream"):
        assert main(["plan", str(tmp_path), "--world-size", "1", "--batch-size", "2", *common]) == 0
    out = capsys.readouterr().out
    assert f"skipped 1 rows in {tmp_path / 'train' / 'a.tar'}" in out
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
        f"{tmp_path / 'train' / 'a.tar'}: member 'k1.txt' claims 5000 " + LIMIT_MSG.format(limit=4096)
    ]
    assert main(["inspect", str(tmp_path), *common]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert f"unreadable: train: {tmp_path / 'train' / 'a.tar'}: member 'k1.txt' claims 5000 bytes" in out
    assert "Traceback" not in out


def test_the_fid_classifier_logs_start_progress_and_end(tmp_path, monkeypatch, caplog):
    from xmodal.data.datamodule import DecodeSpec
    from xmodal.metrics import features

    monkeypatch.setenv("XMODAL_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir()
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 10, 10)).save(png, format="PNG")
    for split in ("train", "val"):
        members = [(f"{split}{i}.png", png.getvalue()) for i in range(4)]
        members = [
            m
            for i, (name, data) in enumerate(members)
            for m in ((name, data), (f"{split}{i}.cls", b"%d" % (i % 2)))
        ]
        (tmp_path / "data" / split / "a.tar").write_bytes(tar_bytes(sorted(members)))
    spec = DecodeSpec(image_size=8, image_channels=3, required=("image",))
    with caplog.at_level(logging.INFO, logger="xmodal"):
        net = features.domain_classifier(tmp_path / "data", spec, num_classes=2, steps=3, progress_s=0.0)
    assert net is not None
    lines = [r.getMessage() for r in caplog.records if r.name == "xmodal"]
    path = features.cache_dir() / next(p.name for p in features.cache_dir().glob("*.pt"))
    assert lines[0] == f"training the FID feature classifier: 3 steps, cached at {path}"
    assert [line.split(", loss")[0] for line in lines[1:3]] == [
        "FID feature classifier: step 1/3",
        "FID feature classifier: step 2/3",
    ]
    assert lines[3].startswith("FID feature classifier trained in ") and ": val accuracy 0.500 (" in lines[3]
    assert len(lines) == 4
    assert torch.load(path, weights_only=True)["weights"]  # cached where the first line said
