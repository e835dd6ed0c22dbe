"""The foundation loader: exact-once evaluation splits and the batch contract."""

from __future__ import annotations

import pytest
import torch

from xmodal.config import compose_config
from xmodal.data.datamodule import PADDING, EvenEvalSampler
from xmodal.factory import build_datamodule, prepare_data


@pytest.mark.parametrize("size", [0, 1, 2, 5, 7, 47])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_eval_sampler_covers_every_sample_once_with_equal_lengths(size, world):
    shares = [list(EvenEvalSampler(size, rank, world)) for rank in range(world)]
    assert len({len(share) for share in shares}) == 1  # same number of rows, so same batch count
    real = sorted(i for share in shares for i in share if i != PADDING)
    assert real == list(range(size))
    assert sum(share.count(PADDING) for share in shares) == -(-size // world) * world - size


def test_batch_contract_and_padding_rows(tiny):
    cfg = compose_config(tiny)
    datamodule = build_datamodule(cfg, prepare_data(cfg))
    datamodule.setup("fit")
    dataset = datamodule.load_split("val")
    batch = datamodule.collate([dataset[0], dataset[PADDING]])
    assert batch["image"].shape == (2, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["text"].dtype == torch.long and batch["text"].shape == batch["text_mask"].shape
    assert batch["valid"].tolist() == [True, False]
    assert batch["__key__"] == ["val-0000000", "val-0000000"]
    assert len(batch["captions"][0]) >= 3  # every reference is kept for evaluation
    assert set(batch) == {"image", "text", "text_mask", "label", "valid", "captions", "__key__"}


def test_holdout_pairs_configured_for_training_never_reach_train_val_or_test(tiny):
    cfg = compose_config([*tiny, "data.shapes.holdout=[red circle]"])
    datamodule = build_datamodule(cfg, prepare_data(cfg))
    for split in ("train", "val", "test", "holdout"):
        captions = [" ".join(s["captions"]) for s in datamodule.load_split(split).samples]
        with_pair = sum("red circle" in c for c in captions)
        assert with_pair == (len(captions) if split == "holdout" else 0), split
