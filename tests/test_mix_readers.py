"""Readers beside the loaders (the FID feature classifier, the judge) read the run's own splits:
every source of ``data.sources``, the explicit val shards, and a cache key that changes with the mix."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from xmodal.data.datamodule import DecodeSpec, ShardDataModule
from xmodal.data.mix import SourceSpec, resolve_mix
from xmodal.data.splits import SplitSettings
from xmodal.metrics import features, judge
from xmodal.tasks import adversarial

SPEC = DecodeSpec(image_size=32, image_channels=3, required=("image",))  # the judge needs 32 px
COLOURS = {0: (220, 20, 20), 1: (20, 220, 20), 2: (20, 20, 220)}


def labelled_source(root: Path, labels: list[int], per_shard: int, prefix: str) -> Path:
    """32 px images coloured by label, ``.cls`` labels, written by webdataset's ShardWriter."""
    from webdataset import ShardWriter

    root.mkdir(parents=True)
    with ShardWriter(str(root / f"{prefix}-%04d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, label in enumerate(labels):
            png = io.BytesIO()
            Image.new("RGB", (32, 32), COLOURS[label]).save(png, format="PNG")
            sink.write({"__key__": f"{prefix}{i:04d}", "png": png.getvalue(), "cls": str(label).encode()})
    return root


@pytest.fixture
def mix_with_a_class_only_the_second_source_has(tmp_path, monkeypatch):
    monkeypatch.setenv("XMODAL_CACHE_DIR", str(tmp_path / "cache"))
    photos = labelled_source(tmp_path / "photos", [0, 1] * 6, 6, "p")  # classes 0, 1: 2 shards
    web = labelled_source(tmp_path / "web", [2] * 6, 6, "w")  # class 2 only
    val = labelled_source(tmp_path / "val", [0, 1, 2], 3, "v")
    specs = [SourceSpec(str(photos), 3, "photos"), SourceSpec(str(web), 1, "web")]
    settings = SplitSettings(
        val_shards=str(val), val_fraction=0, test_fraction=0, index_dir=str(tmp_path / "ix")
    )
    return specs, settings


def test_the_classifiers_train_on_every_source_and_check_on_the_explicit_val(
    mix_with_a_class_only_the_second_source_has,
):
    specs, settings = mix_with_a_class_only_the_second_source_has
    mix = resolve_mix(specs, settings)
    # A bounded sample shares the limit evenly over the sources: 4 + 4 of 12 + 6, not photos' first 8.
    _, labels = features.load_split(mix.data, "train", SPEC, limit=8)
    assert features.label_counts(labels) == {"0": 2, "1": 2, "2": 4}
    _, val_labels = features.load_split(mix.data, "val", SPEC)
    assert val_labels.tolist() == [0, 1, 2]  # the explicit val set, not a source's carved one

    datamodule = ShardDataModule(
        Path(specs[0].shards), 2, 0, SPEC, 8, splits=settings, sources=specs
    )  # shards_dir: the first source, as prepare_data gives it
    strategy = SimpleNamespace(is_global_zero=True, barrier=lambda name: None)
    task = SimpleNamespace(
        _trainer=object(), trainer=SimpleNamespace(datamodule=datamodule, strategy=strategy)
    )
    assert adversarial.feature_classifier(task, "image", 3, steps=3) is not None
    (path,) = features.cache_dir().glob("*.pt")
    record = features.load_cached_net(path, features.DomainClassifier(3, 3))
    assert record["samples"] == 18 and record["labels"] == {"0": 6, "1": 6, "2": 6}
    assert record["val_accuracy"] is not None
    assert adversarial.judge_classifier(task, "image", 3, steps=3) is not None
    _, info = judge.judge_classifier(datamodule.data, SPEC, 3, 3, train_if_missing=False)
    assert info["labels"] == {"0": 6, "1": 6, "2": 6} and info["real_acc_split"] == "val"

    # The cache key covers every source: the first source alone, or another mix, is another key.
    key = features.cache_key(mix.data, SPEC, 3, 3, 0)
    assert path.name == f"{key}.pt"
    assert key != features.cache_key(mix.parts[0], SPEC, 3, 3, 0)
    assert key != features.cache_key(resolve_mix(specs[:1], settings).data, SPEC, 3, 3, 0)
    assert key == features.cache_key(resolve_mix(specs, settings).data, SPEC, 3, 3, 0)  # stable


def test_even_shares_give_a_small_group_all_it_has_and_the_rest_to_the_others():
    assert features.even_shares(8, [12, 6]) == [4, 4]
    assert features.even_shares(10, [2, 100, 100]) == [2, 4, 4]
    assert features.even_shares(7, [3, 3]) == [3, 3]  # less than asked: everything
    assert features.even_shares(5, [10, 10]) == [2, 3]  # the floor's remainder placed
