"""``xmodal-shards write`` (users' own files → shards) and reading img2dataset output as-is."""

from __future__ import annotations

import io
import json
import random
import tarfile
import wave
from pathlib import Path

import pytest
from PIL import Image

from xmodal.codecs.image_files import IMAGE_TOO_LARGE, MISSING_IMAGE, UNREADABLE_IMAGE
from xmodal.data.cli import main
from xmodal.data.shards import iter_tar_samples, read_sizes, split_shards, split_size
from xmodal.data.sources import EMPTY_CAPTION, rows_from_folder
from xmodal.data.writer import WriteOptions, assign_split, write_shards

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


def save_image(path: Path, colour: str = "red", size: tuple[int, int] = (48, 40), fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def wav_bytes(n: int = 800) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(bytes(2 * n))
    return buffer.getvalue()


def read_all(out: Path) -> dict[str, dict[str, dict]]:
    """{split: {key: sample}} read back through the safe reader, checking sizes.json per shard."""
    sizes = read_sizes(out)
    result: dict[str, dict[str, dict]] = {}
    for split, shards in sizes["splits"].items():
        result[split] = {}
        for shard in split_shards(out, split):
            samples = list(iter_tar_samples(shard))
            assert len(samples) == shards[shard.name], shard  # per-shard counts match the tar
            result[split].update({s["__key__"]: s for s in samples})
    return result


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def make_folder(root: Path, n: int = 4) -> Path:
    for i in range(n):
        save_image(root / f"img{i}.jpg", COLOURS[i % len(COLOURS)])
        (root / f"img{i}.txt").write_text(f"a {COLOURS[i % len(COLOURS)]} picture\n", encoding="utf-8")
    return root


def test_folder_of_pairs_to_shards(tmp_path, capsys):
    src = make_folder(tmp_path / "src", 3)
    (src / "img1.txt").write_text("first caption\nsecond caption\n", encoding="utf-8")
    (src / "img2.wav").write_bytes(wav_bytes())
    (src / "img2.cls").write_text("7\n")
    out = tmp_path / "out"

    assert main(["write", str(src), "--out", str(out), "--split", "train", "--quiet"]) == 0
    samples = read_all(out)
    assert set(samples) == {"train"}
    train = samples["train"]
    assert set(train) == {"img0", "img1", "img2"}
    assert train["img0"]["txt"] == b"a red picture"
    assert json.loads(train["img1"]["json"])["captions"] == ["first caption", "second caption"]
    assert train["img1"]["txt"] == b"first caption"
    for sample in train.values():
        assert decode(sample["jpg"]).size == (48, 40)
    assert train["img2"]["wav"] == wav_bytes()  # copied byte for byte
    assert "wav" not in train["img0"]
    assert train["img2"]["cls"] == b"7" and json.loads(train["img2"]["json"])["label"] == 7
    sizes = read_sizes(out)
    assert split_size(out, "train") == 3
    assert sizes["modalities"] == ["audio", "image", "label", "text"]  # registry (name) order
    assert sizes["skipped"] == {}
    assert sizes["source"]["format"] == "folder"
    assert "3 samples written" in capsys.readouterr().out


def test_jsonl_with_caption_lists_and_labels(tmp_path):
    images = tmp_path / "imgs"
    save_image(images / "a.jpg", "red")
    save_image(images / "b.png", "blue", fmt="PNG")
    (images / "b.wav").write_bytes(wav_bytes())
    rows = [
        {"image": "a.jpg", "caption": ["one", "two", "three"], "label": 3},
        {"image": str(images / "b.png"), "caption": "solo", "audio": "b.wav", "label": 0},  # absolute
    ]
    source = tmp_path / "meta" / "rows.jsonl"
    source.parent.mkdir()
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")

    assert (
        main(["write", str(source), "--out", str(tmp_path / "out"), "--images", str(images), "--quiet"]) == 0
    )
    train = read_all(tmp_path / "out")["train"]
    assert set(train) == {"a", "b"}
    meta_a = json.loads(train["a"]["json"])
    assert meta_a["captions"] == ["one", "two", "three"] and meta_a["label"] == 3
    assert meta_a["source"] == str(images / "a.jpg")
    assert "png" in train["b"] and train["b"]["png"] == (images / "b.png").read_bytes()
    assert train["b"]["cls"] == b"0" and train["b"]["wav"] == wav_bytes()


def test_csv_source(tmp_path):
    save_image(tmp_path / "x.jpg", "red")
    save_image(tmp_path / "y.jpg", "green")
    source = tmp_path / "rows.csv"
    source.write_text(
        'image,caption,label\nx.jpg,"a red, square",1\ny.jpg,"[""g one"", ""g two""]",\n', encoding="utf-8"
    )
    assert main(["write", str(source), "--out", str(tmp_path / "out"), "--quiet"]) == 0  # base = CSV's dir
    train = read_all(tmp_path / "out")["train"]
    assert train["x"]["txt"] == b"a red, square" and train["x"]["cls"] == b"1"
    assert json.loads(train["y"]["json"])["captions"] == ["g one", "g two"]
    assert "cls" not in train["y"] and "label" not in json.loads(train["y"]["json"])


def test_coco_captions_become_one_sample_per_image(tmp_path):
    images = tmp_path / "train2017"
    save_image(images / "000000000001.jpg", "red")
    save_image(images / "000000000002.jpg", "blue")
    coco = {
        "images": [{"id": 1, "file_name": "000000000001.jpg"}, {"id": 2, "file_name": "000000000002.jpg"}],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "a red thing"},
            {"id": 11, "image_id": 2, "caption": "blue one"},
            {"id": 12, "image_id": 1, "caption": "something red"},
            {"id": 13, "image_id": 1, "caption": "red again"},
        ],
    }
    source = tmp_path / "annotations" / "captions.json"
    source.parent.mkdir()
    source.write_text(json.dumps(coco), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["write", str(source), "--out", str(out), "--images", str(images), "--quiet"]) == 0
    train = read_all(out)["train"]
    assert set(train) == {"000000000001", "000000000002"}
    assert json.loads(train["000000000001"]["json"])["captions"] == [
        "a red thing",
        "something red",
        "red again",
    ]
    assert read_sizes(out)["source"]["format"] == "coco"


def test_bad_rows_are_skipped_counted_and_reported(tmp_path, capsys):
    src = make_folder(tmp_path / "src", 2)
    (src / "fake.jpg").write_text("<html>not an image</html>")  # a text file saved as .jpg
    (src / "fake.txt").write_text("caption of a fake image")
    save_image(src / "blank.jpg")
    (src / "blank.txt").write_text("   \n\n")
    (src / "orphan.txt").write_text("a caption whose image is missing")
    save_image(src / "huge.jpg", size=(100, 100))  # 10,000 pixels > --max-pixels; the others have 1,920
    (src / "huge.txt").write_text("too many pixels")
    out = tmp_path / "out"

    assert main(["write", str(src), "--out", str(out), "--max-pixels", "5000", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert set(read_all(out)["train"]) == {"img0", "img1"}
    skipped = read_sizes(out)["skipped"]
    assert skipped == {UNREADABLE_IMAGE: 1, EMPTY_CAPTION: 1, MISSING_IMAGE: 1, IMAGE_TOO_LARGE: 1}
    for reason in skipped:
        assert f"skipped: {reason}" in printed
    for name in ("fake.jpg", "blank.jpg", "orphan.txt", "huge.jpg"):
        assert name in printed
    assert "2 samples written, 4 rows skipped" in printed


def test_a_folder_of_clips_and_captions_needs_no_image_and_require_says_what_must_be_there(tmp_path, capsys):
    """A sound recorder's WAVs with captions (audio captioning data): no image in any row."""
    src = tmp_path / "clips"
    src.mkdir()
    for i in range(6):
        (src / f"clip{i}.wav").write_bytes(wav_bytes())
        (src / f"clip{i}.txt").write_text(f"a tone number {i}\n", encoding="utf-8")
    (src / "extra.txt").write_text("a caption with no clip\n", encoding="utf-8")
    assert main(["write", str(src), "--out", str(tmp_path / "out"), "--split", "train", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "every row needs a file of: audio (--require to choose)" in printed
    sizes = read_sizes(tmp_path / "out")
    assert sizes["required"] == ["audio"] and sizes["modalities"] == ["audio", "text"]
    assert sizes["skipped"] == {"missing audio": 1}  # the caption without its clip, counted
    assert sorted(read_all(tmp_path / "out")["train"]) == [f"clip{i}" for i in range(6)]

    assert main(["write", str(src), "--out", str(tmp_path / "img"), "--require", "image", "--quiet"]) == 2
    assert "nothing written (missing image (7))" in capsys.readouterr().err
    assert main(["write", str(src), "--out", str(tmp_path / "x"), "--require", "sound", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--require 'sound': name modalities (" in err and "audio" in err and len(err.splitlines()) == 1


def test_jsonl_bad_rows_report_line_numbers_and_nothing_written_exits_2(tmp_path, capsys):
    source = tmp_path / "rows.jsonl"
    lines = [
        json.dumps({"image": "gone.jpg", "caption": "x"}),
        "{not json",
        json.dumps({"image": "gone2.jpg", "caption": ""}),
    ]
    source.write_text("\n".join(lines), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["write", str(source), "--out", str(out), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert "rows.jsonl:1" in captured.out and "gone.jpg" in captured.out
    assert "rows.jsonl:2" in captured.out
    assert "rows.jsonl:3" in captured.out
    assert "nothing written" in captured.err and "missing image (1)" in captured.err
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))  # no temporary directory left behind


def test_rollover_by_samples_and_by_bytes(tmp_path):
    src = make_folder(tmp_path / "src", 5)
    by_count = tmp_path / "by_count"
    assert (
        main(
            [
                "write",
                str(src),
                "--out",
                str(by_count),
                "--samples-per-shard",
                "2",
                "--split",
                "train",
                "--quiet",
            ]
        )
        == 0
    )
    assert list(read_sizes(by_count)["splits"]["train"].values()) == [2, 2, 1]

    # Noise images do not compress: each sample is ~24 KB, so 3 fit under 80 KB but 4 do not.
    big = tmp_path / "big"
    for i in range(5):
        big.mkdir(exist_ok=True)
        noise = random.Random(i).randbytes(90 * 90 * 3)
        Image.frombytes("RGB", (90, 90), noise).save(big / f"n{i}.png")
        (big / f"n{i}.txt").write_text("noise")
    by_bytes = tmp_path / "by_bytes"
    limit = 80_000
    assert (
        main(
            [
                "write",
                str(big),
                "--out",
                str(by_bytes),
                "--max-shard-bytes",
                str(limit),
                "--split",
                "train",
                "--quiet",
            ]
        )
        == 0
    )
    counts = read_sizes(by_bytes)["splits"]["train"]
    assert len(counts) > 1 and sum(counts.values()) == 5
    for shard in split_shards(by_bytes, "train"):
        assert shard.stat().st_size <= limit, shard
    assert len(read_all(by_bytes)["train"]) == 5


def test_resize_and_reencode(tmp_path):
    src = tmp_path / "src"
    save_image(src / "wide.jpg", "red", size=(100, 50))
    (src / "wide.txt").write_text("wide")
    save_image(src / "tall.png", "blue", size=(40, 90), fmt="PNG")
    (src / "tall.txt").write_text("tall")
    out = tmp_path / "out"
    assert main(["write", str(src), "--out", str(out), "--resize", "32", "--split", "train", "--quiet"]) == 0
    train = read_all(out)["train"]
    assert decode(train["wide"]["jpg"]).size == (32, 32) and decode(train["wide"]["jpg"]).format == "JPEG"
    assert decode(train["tall"]["png"]).size == (32, 32)

    png = tmp_path / "png"
    assert (
        main(["write", str(src), "--out", str(png), "--format-image", "png", "--split", "train", "--quiet"])
        == 0
    )
    train = read_all(png)["train"]
    assert "jpg" not in train["wide"]
    image = decode(train["wide"]["png"])
    assert image.format == "PNG" and image.size == (100, 50)


def test_refuses_existing_out_without_force_and_force_replaces(tmp_path, capsys):
    src = make_folder(tmp_path / "src", 2)
    out = tmp_path / "existing"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["write", str(src), "--out", str(out), "--split", "train", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--force" in err
    assert (out / "precious.txt").read_text() == "keep me"

    assert main(["write", str(src), "--out", str(out), "--force", "--split", "train", "--quiet"]) == 0
    assert not (out / "precious.txt").exists()
    assert set(read_all(out)["train"]) == {"img0", "img1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "src"]  # no temp or old copies left

    with pytest.raises(ValueError, match="holds the source"):
        write_shards(rows_from_folder(src), src, WriteOptions(force=True), source_info={"path": str(src)})


def test_unsafe_and_duplicate_names_become_safe_unique_keys(tmp_path):
    src = tmp_path / "src"
    names = ["my photo.v2", "my photo_v2", "a.b.c", "sub/a.b.c", "über weird!"]
    for name in names:
        save_image(src / f"{name}.jpg")
        (src / f"{name}.txt").write_text(f"caption of {name}")
    out = tmp_path / "out"
    assert main(["write", str(src), "--out", str(out), "--split", "train", "--quiet"]) == 0
    train = read_all(out)["train"]
    assert len(train) == len(names)
    for key in train:
        assert "." not in key and " " not in key and key.isascii(), key
    captions = {json.loads(s["json"])["captions"][0] for s in train.values()}
    assert captions == {f"caption of {name}" for name in names}  # every file kept, none merged


def test_write_carves_val_and_test_by_default_and_says_so(tmp_path, capsys):
    """A plain `xmodal-shards write SRC --out D` gives a folder that trains, validates and tests."""
    src = make_folder(tmp_path / "src", 60)
    out = tmp_path / "out"
    assert main(["write", str(src), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "val 5% / test 5%" in printed and "--split NAME" in printed
    splits = read_sizes(out)["splits"]
    assert set(splits) == {"train", "val", "test"}
    counts = {split: sum(shards.values()) for split, shards in splits.items()}
    assert sum(counts.values()) == 60 and counts["train"] > counts["val"] + counts["test"]
    for split, keys in read_all(out).items():  # each key where its hash puts it
        assert {assign_split(key, 0.05, 0.05) for key in keys} == {split}


def test_val_test_fractions_are_deterministic(tmp_path):
    src = make_folder(tmp_path / "src", 30)
    assignments = []
    for run in ("a", "b"):
        out = tmp_path / run
        argv = [
            "write",
            str(src),
            "--out",
            str(out),
            "--val-fraction",
            "0.3",
            "--test-fraction",
            "0.2",
            "--quiet",
        ]
        assert main(argv) == 0
        samples = read_all(out)
        assignments.append({split: sorted(keys) for split, keys in samples.items()})
    assert assignments[0] == assignments[1]
    assert set(assignments[0]) == {"train", "val", "test"}  # 30 keys: every split gets some
    assert sum(len(keys) for keys in assignments[0].values()) == 30
    assert (
        main(["write", str(src), "--out", str(tmp_path / "c"), "--split", "val", "--val-fraction", "0.1"])
        == 2
    )


def write_img2dataset_shard(root: Path, shard: int, n: int, count: int) -> None:
    """A shard as img2dataset --output_format webdataset writes it (failed rows absent from the tar)."""
    with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
        for i in range(n):
            key = f"{shard:05d}{i:04d}"
            buffer = io.BytesIO()
            Image.new("RGB", (16, 16), COLOURS[i % len(COLOURS)]).save(buffer, format="JPEG")
            members = {
                "jpg": buffer.getvalue(),
                "txt": f"caption {key}".encode(),
                "json": json.dumps(
                    {"url": f"http://x/{key}", "caption": f"caption {key}", "key": key}
                ).encode(),
            }
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    stats = {"count": count, "successes": n, "failed_to_download": count - n, "failed_to_resize": 0}
    (root / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
    (root / f"{shard:05d}.parquet").write_bytes(b"PAR1 not read")


def test_img2dataset_output_is_read_as_is(tmp_path, capsys):
    root = tmp_path / "laion"
    root.mkdir()
    write_img2dataset_shard(root, 0, n=3, count=5)
    write_img2dataset_shard(root, 1, n=2, count=4)
    sizes = read_sizes(root)
    assert sizes["splits"] == {"train": {"00000.tar": 3, "00001.tar": 2}}  # successes, not count
    assert sizes["modalities"] == ["image", "text"]
    shards = split_shards(root, "train")
    assert shards == [root / "00000.tar", root / "00001.tar"]
    keys = [s["__key__"] for shard in shards for s in iter_tar_samples(shard)]
    assert keys == ["000000000", "000000001", "000000002", "000010000", "000010001"]
    assert split_size(root, "train") == 5

    assert main(["inspect", str(root)]) == 0
    printed = capsys.readouterr().out
    assert "000000000" in printed and "caption 000000000" in printed

    (root / "00002.tar").write_bytes(b"")  # still being written: no stats yet → left out, and listed
    assert read_sizes(root)["incomplete"] == ["00002.tar"]
    assert split_size(root, "train") == 5
