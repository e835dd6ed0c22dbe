"""Bad data through the real training loader: every kind is skipped and counted, never fatal alone."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import make_tar
from xmodal.config import compose_config
from xmodal.data.epoch_plan import Topology
from xmodal.data.shapes import ShapesSpec, make_sample
from xmodal.data.shards import iter_tar_samples, write_sizes
from xmodal.factory import build_datamodule


def members_of(sample: dict, key: str, drop: tuple[str, ...] = ()) -> list[tuple[str, bytes]]:
    return [
        (f"{key}.{ext}", data) for ext, data in sample.items() if not ext.startswith("__") and ext not in drop
    ]


def png(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), "red").save(buffer, format="PNG")
    return buffer.getvalue()


class Payload:
    """Unpickling this writes a file: proof that a member was (not) unpickled."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "pwned"))


def bad_shards(root: Path) -> dict[str, int]:
    """One shard per kind of bad data (1 planned sample each), plus a shard of 4 good samples."""
    spec = ShapesSpec()
    good = [make_sample(spec, "val", i) for i in range(6)]
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(jpeg, format="JPEG")
    shards = {
        "good": [m for i in range(4) for m in members_of(good[i], f"good{i}")],
        "html_as_jpg": [
            *members_of(good[4], "html", drop=("png",)),
            ("html.jpg", b"<html><body>404</body></html>"),
        ],
        "truncated_jpeg": [*members_of(good[4], "cut", drop=("png",)), ("cut.jpg", jpeg.getvalue()[:200])],
        "non_utf8_text": [("latin.png", good[5]["png"]), ("latin.txt", "caf\xe9 cr\xe8me".encode("latin-1"))],
        "oversized_image": [*members_of(good[5], "big", drop=("png",)), ("big.png", png(300))],
        "missing_caption": [("nocap.png", good[5]["png"])],
        "duplicate_key": [*members_of(good[5], "dup"), ("dup.png", good[5]["png"])],
        "dotted_basename": [("a.b.png", good[5]["png"]), ("a.b.txt", b"a caption")],
        "pickle_member": [
            ("evil.png", good[5]["png"]),
            ("evil.pyd", pickle.dumps(Payload(str(root / "pwned.txt")))),
        ],
    }
    sizes = {}
    (root / "val").mkdir(parents=True)
    for name, members in shards.items():
        make_tar(root / "val" / f"{name}.tar", members)
        sizes[f"{name}.tar"] = 4 if name == "good" else 1
    whole = make_tar(root / "val" / "whole.tar", members_of(good[5], "trunc")).read_bytes()
    (root / "val" / "whole.tar").unlink()
    (root / "val" / "truncated_tar.tar").write_bytes(whole[: len(whole) * 2 // 3])  # cut inside a member
    sizes["truncated_tar.tar"] = 1
    make_tar(root / "val" / "empty.tar", [])
    sizes["empty.tar"] = 0
    for split in ("train", "test"):
        (root / split).mkdir()
        make_tar(root / split / "good.tar", shards["good"])
    write_sizes(root, {"splits": {"val": sizes, "train": {"good.tar": 4}, "test": {"good.tar": 4}}})
    return sizes


def test_every_kind_of_bad_sample_is_skipped_and_counted(tiny, tmp_path):
    root = tmp_path / "shards"
    sizes = bad_shards(root)
    cfg = compose_config([*tiny, f"data.shards={root}", "data.batch_size=4", "data.max_image_pixels=10000"])
    datamodule = build_datamodule(cfg, root)
    datamodule.setup("fit")
    batches = list(datamodule.loader("val", Topology(0, 1, 0)))  # the epoch completes
    keys = sorted(k for b in batches for k, v in zip(b["__key__"], b["valid"], strict=True) if v)
    assert keys == ["good0", "good1", "good2", "good3"]
    skipped = {Path(url).stem: n for url, n in datamodule.skipped()["val"].items()}
    bad = {name.removesuffix(".tar") for name, n in sizes.items() if n and name != "good.tar"}
    assert skipped == dict.fromkeys(bad, 1)  # one counted skip per injected bad sample, none elsewhere
    assert not (root / "pwned.txt").exists()  # the pickle member was refused, never unpickled


def test_skip_counts_reach_the_metrics_of_a_training_run(tiny, tmp_path):
    from xmodal.train import train

    root = tmp_path / "shards"
    sizes = bad_shards(root)
    overrides = [*tiny, f"data.shards={root}", "data.batch_size=4", "data.max_image_pixels=10000"]
    train(
        compose_config(
            [
                *overrides,
                "logger=csv",
                "trainer.max_steps=2",
                "trainer.val_check_interval=null",
                "run.id=bad",
                "test_after_fit=false",
            ]
        )
    )
    run_dir = tmp_path / "outputs" / "caption_shards" / "bad"  # experiment_name follows the data
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    bad = sum(1 for name, n in sizes.items() if n and name != "good.tar")
    assert rows[-1]["data/skipped_val"] == bad and rows[-1]["data/skipped_train"] == 0
    assert json.loads((run_dir / "metrics.json").read_text())["data_skipped"]["val"]


def test_code_bearing_members_are_skipped_unread_never_unpickled(tmp_path):
    # Once a refused shard; now the member is skipped unread (no modality reads .pyd, and
    # code-bearing formats are never handed out), so the sample keeps its image only.
    bad_shards(tmp_path)
    [sample] = iter_tar_samples(tmp_path / "val" / "pickle_member.tar")
    assert sample["__key__"] == "evil" and set(sample) == {"__key__", "__shard__", "png"}
    assert not (tmp_path / "pwned.txt").exists()
    # A dotted basename reads as webdataset does: key 'a' with members of role 'b'. No default-role
    # image or caption is there, so decoding it is a counted skip (test above), not a refused shard.
    [sample] = iter_tar_samples(tmp_path / "val" / "dotted_basename.tar")
    assert sample["__key__"] == "a" and set(sample) == {"__key__", "__shard__", "b.png", "b.txt"}


def test_consecutive_failures_stop_the_run_naming_the_shard(tiny, tmp_path):
    root = tmp_path / "shards"
    bad_shards(root)
    cfg = compose_config(
        [*tiny, f"data.shards={root}", "data.batch_size=4", "data.max_consecutive_failures=2"]
    )
    datamodule = build_datamodule(cfg, root)
    datamodule.setup("fit")
    with pytest.raises(RuntimeError, match=r"consecutive data failures .* shard .*\.tar"):
        list(datamodule.loader("val", Topology(0, 1, 0)))


def test_a_split_without_shards_is_a_clear_error(tiny, tmp_path):
    root = tmp_path / "shards"
    bad_shards(root)
    sizes = json.loads((root / "sizes.json").read_text())
    sizes["splits"]["test"] = {}
    (root / "sizes.json").write_text(json.dumps(sizes))
    datamodule = build_datamodule(compose_config([*tiny, f"data.shards={root}"]), root)
    datamodule.setup("fit")
    with pytest.raises(ValueError, match=r"split 'test' of .*shards lists no shards"):
        datamodule.loader("test", Topology(0, 1, 0))
