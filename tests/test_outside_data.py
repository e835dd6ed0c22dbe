"""Data as users bring it: webdataset ShardWriter tars, img2dataset output, patterns, lists, wids
indexes, carved splits, counts that lie, and runs that stop before starting when data is missing."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY, make_tar, run_cli
from xmodal.config import ConfigError, compose_config, validate
from xmodal.data.batch import DecodeSpec, decode_sample
from xmodal.data.carve import Carve, key_position
from xmodal.data.cli import main
from xmodal.data.epoch_plan import Topology
from xmodal.data.index import index_shards
from xmodal.data.resolve import expand_braces, resolve_source
from xmodal.data.shards import iter_tar_samples, read_sizes, write_sizes
from xmodal.data.splits import SplitSettings, resolve_splits
from xmodal.data.stream import ShardStream

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def image_bytes(colour: str, fmt: str, size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), COLOURS[colour]).save(buffer, format=fmt)
    return buffer.getvalue()


def write_shardwriter_dir(root: Path, n: int = 64, per_shard: int = 16, size: int = 32) -> Path:
    """What a user's own script writes with webdataset's ShardWriter: no index, jpg and webp
    images, a ``seg.png`` mask and a ``.npy`` extra per sample, captions in ``.txt``."""
    from webdataset import ShardWriter

    root.mkdir(parents=True)
    with ShardWriter(str(root / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            colour = list(COLOURS)[i % 3]
            mask = io.BytesIO()
            Image.new("L", (size, size), i % 2).save(mask, format="PNG")
            extra = io.BytesIO()
            np.save(extra, np.arange(3.0), allow_pickle=False)
            webp = i % 2 == 1
            sink.write(
                {
                    "__key__": f"sample{i:05d}",
                    "webp" if webp else "jpg": image_bytes(colour, "WEBP" if webp else "JPEG", size),
                    "seg.png": mask.getvalue(),
                    "npy": extra.getvalue(),
                    "txt": f"a {colour} square".encode(),
                }
            )
    return root


def write_img2dataset_dir(root: Path, shards: int = 2, per_shard: int = 20, fmt: str = "jpg") -> Path:
    """img2dataset --output_format webdataset as it lays a folder out: ``00000.tar`` holding
    ``000000000.jpg/.txt/.json``, ``00000.parquet`` and ``00000_stats.json`` per shard, everything
    train; failed downloads (every 5th row) are rows of the parquet but absent from the tar."""
    root.mkdir(parents=True)
    for shard in range(shards):
        members, successes = [], 0
        for row in range(per_shard):
            key = f"{shard:05d}{row:04d}"
            if row % 5 == 4:
                continue  # failed to download
            colour = list(COLOURS)[row % 3]
            meta = {"url": f"http://example.com/{key}.jpg", "caption": f"a {colour} square", "key": key}
            meta |= {"status": "success", "width": 32, "height": 32, "error_message": None}
            members += [
                (f"{key}.{fmt}", image_bytes(colour, "WEBP" if fmt == "webp" else "JPEG")),
                (f"{key}.txt", f"a {colour} square".encode()),
                (f"{key}.json", json.dumps(meta).encode()),
            ]
            successes += 1
        make_tar(root / f"{shard:05d}.tar", members)
        (root / f"{shard:05d}.parquet").write_bytes(b"PAR1" + b"\0" * 16 + b"PAR1")  # never read
        stats = {"count": per_shard, "successes": successes, "failed_to_download": per_shard - successes}
        stats |= {"failed_to_resize": 0, "status_dict": {"success": successes}}
        (root / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
    return root


@pytest.fixture(scope="module")
def shardwriter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shardwriter_dir(tmp_path_factory.mktemp("user") / "photos")


def keys_of(data, split: str) -> list[str]:
    """Every key a split streams: the real stream, one rank, tar order."""
    stream = ShardStream(data.shards(split), "exact", 0, Topology(0, 1, 0), 4, shuffle_buffer=1)
    return [k for b in stream for k, v in zip(b["__key__"], b["valid"], strict=True) if v]


def test_shardwriter_tars_without_index_are_read_and_split(shardwriter_dir, tmp_path):
    cache = tmp_path / "cache"
    before = sorted(p.name for p in shardwriter_dir.iterdir())
    data = resolve_splits(shardwriter_dir, SplitSettings(index_dir=str(cache)))
    assert data.source.kind == "tars" and set(data.splits) == {"train", "val", "test"}
    assert data.how["val"].startswith("carved from train")
    keys = {split: keys_of(data, split) for split in data.splits}
    assert {split: len(k) for split, k in keys.items()} == {s: data.size(s) for s in data.splits}
    assert sorted(k for ks in keys.values() for k in ks) == [f"sample{i:05d}" for i in range(64)]
    assert keys["val"] and keys["test"]  # 5% each of 64 keys: a few
    assert sorted(p.name for p in shardwriter_dir.iterdir()) == before  # the data dir is never written
    assert len(list(cache.glob("*.json"))) == 1  # the index is cached outside it
    # Every sample decodes: jpg and webp images, .txt captions; seg.png and .npy are never asked for.
    spec = DecodeSpec(image_size=16)
    raws = [r for shard in data.source.urls() for r in iter_tar_samples(shard)]
    assert all("npy" not in r for r in raws) and all("seg.png" in r for r in raws)
    decoded = [decode_sample(r, spec, train=False) for r in raws]
    assert {tuple(d["image"].shape) for d in decoded} == {(3, 16, 16)}
    red = [d for d in decoded if d["caption"] == "a red square"]
    assert all(int(d["image"][0].float().mean()) > 180 > int(d["image"][2].float().mean()) for d in red)


def test_carving_is_stable_disjoint_and_the_same_on_every_rank_and_worker(shardwriter_dir):
    settings = SplitSettings(val_fraction=0.2, test_fraction=0.1)
    data = resolve_splits(shardwriter_dir, settings)
    expected = {}
    for key in (f"sample{i:05d}" for i in range(64)):
        position = key_position(key) / 2**64
        expected[key] = "test" if position < 0.1 else "val" if position < 0.3 else "train"
    for split in ("train", "val", "test"):
        seen = []
        for rank in range(2):  # 2 ranks × 2 workers, each worker's slot run in this process
            stream = ShardStream(data.shards(split), "exact", 3, Topology(rank, 2, 2), 2)
            for worker in range(2):
                for batch in stream.iter_worker(worker):
                    seen += [k for k, v in zip(batch["__key__"], batch["valid"], strict=True) if v]
        assert sorted(seen) == sorted(k for k, s in expected.items() if s == split), split
    assert Carve(0.2, 0.1).counts(expected) == {
        s: list(expected.values()).count(s) for s in ("train", "val", "test")
    }


def test_img2dataset_output_trains_only_split_is_carved_and_webp_reads(tmp_path):
    root = write_img2dataset_dir(tmp_path / "laion", fmt="webp")
    data = resolve_splits(root, SplitSettings(index_dir=str(tmp_path / "cache")))
    assert data.source.kind == "img2dataset" and data.source.stated == {
        str(root / "00000.tar"): 16,
        str(root / "00001.tar"): 16,
    }
    assert data.size("train") + data.size("val") + data.size("test") == 32 and not data.warnings
    raw = next(iter_tar_samples(root / "00000.tar"))
    assert decode_sample(raw, DecodeSpec(image_size=16), train=False)["image"].shape == (3, 16, 16)
    # The whole config check passes: val and test are carved, nothing is asked of the user.
    validate(compose_config([f"data.shards={root}", f"paths.data_dir={tmp_path / 'd'}"]))


def test_every_source_form_resolves_to_the_same_shards(shardwriter_dir, tmp_path):
    tars = sorted(str(p) for p in shardwriter_dir.glob("*.tar"))
    pattern = str(shardwriter_dir / "shard-{000000..000003}.tar")
    assert expand_braces(pattern) == tars and expand_braces("a{1,2}-{08..10}") == [
        "a1-08", "a1-09", "a1-10", "a2-08", "a2-09", "a2-10"
    ]  # fmt: skip
    listing = tmp_path / "shards.txt"
    listing.write_text("# my shards\n" + "\n".join(Path(t).name for t in tars) + "\n")
    shutil.copytree(shardwriter_dir, tmp_path / "photos")
    (tmp_path / "shards.txt").rename(tmp_path / "photos" / "shards.txt")
    wids = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": []}
    wids["shardlist"] = [{"url": Path(t).name, "nsamples": 16} for t in tars]
    (tmp_path / "photos" / "index.json").write_text(json.dumps(wids))
    nested = tmp_path / "nested"
    for k, tar in enumerate(tars):
        (nested / f"part{k % 2}" / "deep").mkdir(parents=True, exist_ok=True)
        shutil.copy(tar, nested / f"part{k % 2}" / "deep" / Path(tar).name)
    gz = tmp_path / "gz"
    gz.mkdir()
    for tar in tars:
        with tarfile.open(tar) as src, tarfile.open(gz / (Path(tar).stem + ".tar.gz"), "w:gz") as dst:
            for member in src.getmembers():
                dst.addfile(member, src.extractfile(member))
    forms = {
        "pattern": pattern,
        "glob": str(shardwriter_dir / "*.tar"),
        "list": str(tmp_path / "photos" / "shards.txt"),
        "wids": str(tmp_path / "photos" / "index.json"),
        "nested": str(nested),
        "gz": str(gz),
    }
    for kind, spec in forms.items():
        data = resolve_splits(spec, SplitSettings(val_fraction=0.2, test_fraction=0.1))
        assert data.size("train") + data.size("val") + data.size("test") == 64, kind
        assert len(data.source.urls()) == 4, kind
        # What the end of a run reads (train.py's holdout check): every form, not only directories.
        assert sum(read_sizes(spec)["splits"]["train"].values()) == 64, kind
    assert resolve_source(forms["wids"]).stated[str(tmp_path / "photos" / tars[0].rsplit("/", 1)[1])] == 16
    for bad, message in [
        (str(shardwriter_dir / "shard-{000000..000009}.tar"), "shard-000004.tar does not exist and 5 more"),
        ("ftp://example.com/shards/{000..009}.tar", "unknown url scheme"),  # http(s), s3: test_remote.py
    ]:
        with pytest.raises((OSError, ValueError), match=message):
            resolve_source(bad)


def test_split_folders_and_explicit_val_shards(shardwriter_dir, tmp_path):
    root = tmp_path / "folders"
    tars = sorted(shardwriter_dir.glob("*.tar"))
    for split, chosen in (("train", tars[:2]), ("validation", tars[2:3]), ("test", tars[3:])):
        (root / split).mkdir(parents=True)
        for tar in chosen:
            shutil.copy(tar, root / split / tar.name)
    data = resolve_splits(root)
    assert {s: data.size(s) for s in data.splits} == {"train": 32, "val": 16, "test": 16}
    assert not data.carve.active  # the data's own splits: nothing carved
    with pytest.raises(ValueError, match=r"data.val_fraction=0.1: .* has its own val split"):
        resolve_splits(root, SplitSettings(val_fraction=0.1))
    explicit = resolve_splits(
        shardwriter_dir, SplitSettings(val_shards=str(root / "validation"), test_fraction=0)
    )
    assert explicit.how["val"] == "data.val_shards" and explicit.size("val") == 16
    assert "test" not in explicit.splits and explicit.size("train") == 64
    (root / "stray.tar").write_bytes((root / "test" / tars[3].name).read_bytes())
    with pytest.raises(ValueError, match=r"tars outside them \(stray.tar\)"):
        resolve_source(root)


def lying_dir(root: Path, stated: int, holds: int) -> Path:
    """train/val/test folders whose sizes.json states ``stated`` samples for a train shard of ``holds``."""
    for split in ("train", "val", "test"):
        (root / split).mkdir(parents=True)
        n = holds if split == "train" else 4
        make_tar(root / split / "a.tar", [(f"{split}{i:03d}.txt", f"caption {i}".encode()) for i in range(n)])
    write_sizes(root, {"splits": {"train": {"a.tar": stated}, "val": {"a.tar": 4}, "test": {"a.tar": 4}}})
    return root


def test_an_under_counting_index_is_reported_and_never_read_past_silently(tmp_path, caplog, capsys):
    root = lying_dir(tmp_path / "under", stated=10, holds=62)
    data = resolve_splits(root)  # own splits, counts stated: nothing scanned
    stream = ShardStream(data.shards("train"), "exact", 0, Topology(0, 1, 0), 5, shuffle_buffer=1)
    with caplog.at_level("WARNING"):
        assert sum(len(b["__key__"]) for b in stream) == 10
        assert sum(len(b["__key__"]) for b in stream) == 10  # a second epoch: the warning came once
    more = [
        r.getMessage()
        for r in caplog.records
        if "holds more samples than its index says (10)" in r.getMessage()
    ]
    assert len(more) == 1 and "train/a.tar" in more[0]
    assert main(["inspect", str(root), "--cache-dir", str(tmp_path / "c")]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "train/a.tar: holds 62 samples, its index (sizes.json) says 10 (52 more" in out
    assert main(["index", str(root), "--cache-dir", str(tmp_path / "c"), "--sizes"]) == 0
    assert json.loads((root / "sizes.json").read_text())["splits"]["train"] == {"train/a.tar": 62}
    assert resolve_splits(root).size("train") == 62


def test_an_over_counting_index_is_reported_both_at_inspect_and_as_counted_failures(tmp_path, capsys):
    root = lying_dir(tmp_path / "over", stated=30, holds=20)
    data = resolve_splits(root)
    stream = ShardStream(data.shards("train"), "exact", 0, Topology(0, 1, 0), 5, shuffle_buffer=1)
    valid = sum(int(v) for b in stream for v in b["valid"])
    assert valid == 20 and stream.skip_counts() == {str(root / "train" / "a.tar"): 10}
    assert main(["inspect", str(root), "--cache-dir", str(tmp_path / "c")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "holds 20 samples, its index (sizes.json) says 30 (10 fewer" in out
    # When a scan is needed anyway (carving the train-only index), the scanned count wins, said once.
    write_sizes(root, {"splits": {"train": {"a.tar": 30}}})
    carved = resolve_splits(root, SplitSettings(val_fraction=0.2, test_fraction=0.2))
    assert carved.size("train") + carved.size("val") + carved.size("test") == 20
    assert carved.warnings == [
        f"{root / 'train' / 'a.tar'}: holds 20 samples, sizes.json says 30 (10 fewer); using 20"
    ]


def test_dotted_keys_unknown_members_and_bad_input_are_one_line_not_a_refusal(tmp_path, capsys):
    from webdataset import ShardWriter

    root = tmp_path / "dotted"
    root.mkdir()
    with ShardWriter(str(root / "s-%02d.tar"), maxcount=8, verbose=0) as sink:
        for i in range(4):
            sink.write({"__key__": f"img.{i:04d}", "jpg": image_bytes("red", "JPEG"), "txt": b"a red square"})
    [sample] = iter_tar_samples(root / "s-00.tar")  # as webdataset reads it: key 'img'
    assert sample["__key__"] == "img" and "0000.jpg" in sample
    with pytest.raises(
        ValueError, match=r"has no image \(it holds 0000.jpg, 0001.jpg, 0002.jpg \.\.\.: keys with dots"
    ):
        decode_sample(sample, DecodeSpec(), train=False)
    assert main(["inspect", str(root), "--cache-dir", str(tmp_path / "c")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "dotted keys: 1 sample(s)" in out and "<digits>.jpg" in out
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "x.tar").write_bytes(b"not a tar " * 200)
    assert main(["plan", str(garbage), "--world-size", "1", "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "x.tar" in err


def test_a_run_without_val_data_stops_before_anything_starts_naming_the_fix(shardwriter_dir, tmp_path):
    out = tmp_path / "outputs"
    result = run_cli(
        ["xmodal-train", f"data.shards={shardwriter_dir}", "data.val_fraction=0", f"paths.output_dir={out}"],
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "split 'val' not in" in result.stderr and "data.val_fraction=0.05" in result.stderr
    assert "data.val_shards" in result.stderr and not out.exists()  # no config tree, no run dir


def test_experiment_name_follows_the_data_and_is_checked_like_a_run_id(shardwriter_dir, tmp_path):
    assert compose_config([]).experiment_name == "shapes_caption"
    cfg = compose_config([f"data.shards={shardwriter_dir}"])
    assert cfg.experiment_name == "caption_photos"
    gan = compose_config(["experiment=shapes_gan", f"data.shards={shardwriter_dir}"])
    assert gan.experiment_name == "gan_photos"
    assert (
        compose_config([f"data.shards={shardwriter_dir}", "experiment_name=mine"]).experiment_name == "mine"
    )
    from xmodal.train import train

    out = tmp_path / "a" / "b" / "outputs"
    with pytest.raises(ConfigError, match="experiment_name: must be 1-128 characters"):
        train(compose_config(["experiment_name=../../../x", f"paths.output_dir={out}"]))
    assert not (tmp_path / "x").exists() and not out.exists()


def test_index_cache_is_reused_and_invalidated_by_a_changed_shard(shardwriter_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shardwriter_dir, copy)
    cache = tmp_path / "cache"
    urls = sorted(str(p) for p in copy.glob("*.tar"))
    first = index_shards(urls, None, cache)
    assert [c.samples for c in first.values()] == [16, 16, 16, 16]
    assert first[urls[0]].kinds == {"jpg": 8, "webp": 8, "seg.png": 16, "npy": 16, "txt": 16}
    make_tar(Path(urls[0]), [("k.txt", b"one")])  # rewritten: size and mtime change
    assert index_shards(urls, None, cache)[urls[0]].samples == 1
    assert len(list(cache.glob("*.json"))) == 2


@pytest.mark.slow
def test_xmodal_train_on_shardwriter_tars_with_no_other_data_flag(shardwriter_dir, tmp_path):
    """`xmodal-train data.shards=<ShardWriter dir>`: trains, validates (carved val) and tests (carved test)."""
    result = run_cli(
        [
            "xmodal-train",
            f"data.shards={shardwriter_dir}",
            *TINY,
            f"paths.output_dir={tmp_path / 'outputs'}",
            f"paths.data_dir={tmp_path / 'data'}",
            "logger=csv",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "run.id=mine",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "caption_photos" / "mine"
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["global_step"] == 2 and "val/bleu4" in summary["val"] and "test/bleu4" in summary["test"]
    assert summary["data_skipped"] == {}  # jpg and webp both decode; seg.png and .npy ignored
    assert list((tmp_path / "data" / "shard-index").glob("*.json"))
