"""The LightningDataModule over the shard stream: batch contract, exact-once splits, holdout."""

from __future__ import annotations

import json

import torch

from xmodal.config import compose_config
from xmodal.data.datamodule import iter_split, sample_captions
from xmodal.data.epoch_plan import Topology
from xmodal.factory import build_datamodule, prepare_data
from xmodal.tasks.base import XmodalTask
from xmodal.tasks.caption.task import CaptionTask
from xmodal.tasks.gan.task import AdversarialTask
from xmodal.tasks.vae.task import VaeTask


def datamodule_for(overrides):
    cfg = compose_config(overrides)
    datamodule = build_datamodule(cfg, prepare_data(cfg))
    datamodule.setup("fit")
    return datamodule


def test_batch_contract(tiny):
    datamodule = datamodule_for(tiny)
    batch = next(iter(datamodule.loader("val", Topology(0, 1, 0))))
    # Loaders move uint8 images; every task turns them into float in [-1, 1] on its device.
    pixels = batch["image"]
    assert pixels.shape == (16, 3, 64, 64) and pixels.dtype == torch.uint8
    for task in (CaptionTask, AdversarialTask, VaeTask):
        assert issubclass(task, XmodalTask)
    batch = XmodalTask().on_after_batch_transfer(batch, 0)
    assert batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert torch.equal(batch["image"][pixels == 0], torch.full_like(batch["image"][pixels == 0], -1.0))
    assert torch.equal(batch["image"][pixels == 255], torch.full_like(batch["image"][pixels == 255], 1.0))
    assert torch.allclose(batch["image"], pixels.float() / 127.5 - 1.0)
    assert batch["text"].dtype == torch.long and batch["text"].shape == batch["text_mask"].shape
    assert batch["valid"].dtype == torch.bool and batch["valid"].all()
    assert len(batch["captions"][0]) >= 3  # every reference is kept for evaluation
    assert set(batch) == {"image", "text", "text_mask", "label", "valid", "captions", "__key__", "__shard__"}


def test_every_split_is_exact_once_over_two_ranks_with_equal_batch_counts(tiny):
    # 47 validation samples over 2 ranks: the ranks need padding rows to run equal batch counts.
    datamodule = datamodule_for([*tiny, "data.shapes.n_val=47"])
    all_keys = [raw["__key__"] for raw in iter_split(datamodule.shards_dir, "val")]
    batches = {rank: list(datamodule.loader("val", Topology(rank, 2, 0))) for rank in (0, 1)}
    assert len(batches[0]) == len(batches[1])
    seen = [
        k
        for rank in (0, 1)
        for b in batches[rank]
        for k, v in zip(b["__key__"], b["valid"], strict=True)
        if v
    ]
    assert sorted(seen) == sorted(all_keys)  # every key exactly once
    padding = sum(int((~b["valid"]).sum()) for rank in (0, 1) for b in batches[rank])
    assert padding == len(batches[0]) * 2 * datamodule.batch_size - 47 > 0


def test_training_epochs_cover_the_train_split_and_reshuffle(tiny):
    datamodule = datamodule_for(tiny)
    loader = datamodule.loader("train", Topology(0, 1, 0))
    epochs = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        epochs.append([k for b in loader for k, v in zip(b["__key__"], b["valid"], strict=True) if v])
    assert (
        sorted(epochs[0])
        == sorted(epochs[1])
        == sorted(r["__key__"] for r in iter_split(datamodule.shards_dir, "train"))
    )
    assert epochs[0] != epochs[1]


def test_holdout_pairs_configured_for_training_never_reach_train_val_or_test(tiny):
    datamodule = datamodule_for([*tiny, "data.shapes.holdout=[red circle]"])
    for split in ("train", "val", "test", "holdout"):
        captions = [" ".join(sample_captions(raw)) for raw in iter_split(datamodule.shards_dir, split)]
        with_pair = sum("red circle" in c for c in captions)
        assert with_pair == (len(captions) if split == "holdout" else 0), split


def test_unreadable_samples_are_skipped_counted_and_reported(tiny, tmp_path):
    """A shard directory with a sample whose image is garbage: the epoch completes, the skip is counted."""
    from xmodal.data.shards import write_sizes, write_tar_shard

    good = next(iter_split(datamodule_for(tiny).shards_dir, "train"))
    rows = [{**good, "__key__": f"k{i}"} for i in range(5)] + [{**good, "__key__": "bad", "png": b"<html>"}]
    for row in rows:
        row.pop("__shard__", None)
    for split in ("train", "val", "test"):
        (tmp_path / split).mkdir()
        write_tar_shard(tmp_path / split / "shard-000000.tar", rows)
    write_sizes(tmp_path, {"splits": {s: {"shard-000000.tar": 6} for s in ("train", "val", "test")}})
    datamodule = datamodule_for([*tiny, f"data.shards={tmp_path}", "data.batch_size=3"])
    batches = list(datamodule.loader("val", Topology(0, 1, 0)))
    assert sum(int(b["valid"].sum()) for b in batches) == 5 and len(batches) == 2
    assert datamodule.skipped() == {"val": {str(tmp_path / "val" / "shard-000000.tar"): 1}}
    assert json.dumps(datamodule.skipped())  # reportable in metrics.json


def test_shards_plan_command_reports_equal_batches_and_dumps_every_row(tiny, tmp_path, capsys):
    from xmodal.data.cli import main

    shards_dir = datamodule_for(tiny).shards_dir
    dump = tmp_path / "keys.txt"
    args = ["plan", str(shards_dir), "--world-size", "2", "--workers", "2", "--batch-size", "8"]
    assert main([*args, "--dump-keys", str(dump)]) == 0
    out = capsys.readouterr().out
    assert "batches equal on all ranks: True" in out and "exact-once: 0 duplicates, 0 missing" in out
    lines = [line.split() for line in dump.read_text().splitlines()]
    valid_keys = [key for _rank, _worker, _epoch, key, valid in lines if valid == "1"]
    assert sorted(valid_keys) == sorted(r["__key__"] for r in iter_split(shards_dir, "train"))
    assert main([*args[:-1], "7"]) == 2
    assert "must divide by --world-size 2" in capsys.readouterr().err


def test_training_caption_is_a_function_of_seed_epoch_and_key():
    from xmodal.data.datamodule import DecodeSpec, decode_sample
    from xmodal.data.shapes import ShapesSpec, make_sample

    raw = make_sample(ShapesSpec(), "train", 1)
    captions = json.loads(raw["json"])["captions"]

    def pick(seed: int, epoch: int) -> str:
        return decode_sample({**raw, "__epoch__": epoch}, DecodeSpec(seed=seed), train=True)["caption"]

    by_epoch = [pick(0, e) for e in range(12)]
    assert by_epoch == [pick(0, e) for e in range(12)]  # deterministic: a resumed run sees the same
    assert len(set(by_epoch)) > 1 and set(by_epoch) <= set(captions)  # varies from epoch to epoch
    assert [pick(1, e) for e in range(12)] != by_epoch  # and with the seed
    assert decode_sample(raw, DecodeSpec(), train=False)["caption"] == captions[0]
