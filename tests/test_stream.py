"""The streaming data contract: exact-once epochs, equal batch counts, epochs, resampling, resume, bad data."""

from __future__ import annotations

import collections
import io
import math
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.fabric.utilities.types import _Stateful
from rich.console import Console

from xmodal.data.epoch_plan import ShardInfo, Topology, plan_epoch, shards_from_dir, shuffle_order
from xmodal.data.loader import StreamLoader, pack_tensors
from xmodal.data.plan import plan_report, print_plan
from xmodal.data.shards import ShardError, iter_tar_samples, write_sizes, write_tar_shard
from xmodal.data.splits import SplitSettings
from xmodal.data.stream import ShardStream

SIZES = (7, 3, 5, 2, 4)


def make_shards(root: Path, sizes=SIZES, split: str = "train") -> list[ShardInfo]:
    (root / split).mkdir(parents=True, exist_ok=True)
    for k, n in enumerate(sizes):
        samples = [{"__key__": f"s{k}-{i:04d}", "txt": f"caption {k} {i}".encode()} for i in range(n)]
        write_tar_shard(root / split / f"shard-{k:02d}.tar", samples)
    write_sizes(root, {"splits": {split: {f"shard-{k:02d}.tar": n for k, n in enumerate(sizes)}}})
    return shards_from_dir(root, split)


def all_keys(sizes=SIZES) -> set[str]:
    return {f"s{k}-{i:04d}" for k, n in enumerate(sizes) for i in range(n)}


def rank_batches(stream: ShardStream) -> list[tuple[list[str], list[bool]]]:
    """One rank's epoch run in-process, workers interleaved round-robin as a DataLoader does."""
    iterators = [stream.iter_worker(w) for w in range(stream.topology.workers)]
    out = []
    while iterators:
        alive = []
        for it in iterators:
            batch = next(it, None)
            if batch is not None:
                out.append((list(batch["__key__"]), batch["valid"].tolist()))
                alive.append(it)
        iterators = alive
    return out


def loader_batches(loader, limit: int | None = None) -> list[tuple[list[str], list[bool]]]:
    out = []
    for batch in loader:
        out.append((list(batch["__key__"]), batch["valid"].tolist()))
        if limit is not None and len(out) == limit:
            break
    return out


@pytest.fixture
def shards(tmp_path: Path) -> list[ShardInfo]:
    return make_shards(tmp_path)


@pytest.mark.parametrize(
    ("world", "workers", "sizes", "drop_last"),
    [
        (2, 2, SIZES, False),
        (1, 3, SIZES, False),
        (2, 2, (7, 3), False),  # fewer shards than slots: two slots only pad
        (2, 0, SIZES, False),  # the main process as the single worker
        (2, 2, SIZES, True),  # training: trim instead of pad
    ],
)
def test_exact_once_and_equal_batches(tmp_path, world, workers, sizes, drop_last):
    shards = make_shards(tmp_path, sizes)
    batch_size = 2
    seen = collections.Counter()
    batch_counts, padding_rows = [], 0
    for rank in range(world):
        stream = ShardStream(
            shards, "exact", 3, Topology(rank, world, workers), batch_size, drop_last=drop_last
        )
        stream.set_epoch(1)
        plan = stream.plan()
        batches = rank_batches(stream)
        assert len(batches) == plan.batches_per_rank == len(stream)
        assert all(len(keys) == batch_size for keys, _ in batches)
        batch_counts.append(len(batches))
        for keys, valid in batches:
            seen.update(k for k, v in zip(keys, valid, strict=True) if v)
            padding_rows += valid.count(False)
        assert sum(valid.count(True) for _, valid in batches) == plan.valid_per_rank[rank]
    assert len(set(batch_counts)) == 1 and batch_counts[0] > 0
    assert set(seen.values()) == {1}  # never twice
    if drop_last:
        assert padding_rows == 0
        assert len(seen) == sum(sizes) - plan.dropped and plan.dropped > 0
    else:
        assert set(seen) == all_keys(sizes)  # every real sample once
        assert padding_rows == plan.padding > 0
    slots = world * max(workers, 1)
    if len(sizes) < slots:
        assert any("slots read no shard" in w for w in plan.warnings)
    elif len(sizes) < 4 * slots:
        assert any("fewer than 4" in w for w in plan.warnings)


def test_plan_is_pure_and_reshuffles_per_epoch(shards):
    topology = Topology(0, 2, 2)
    plan = lambda epoch: plan_epoch(shards, "exact", 0, epoch, topology, 2)  # noqa: E731
    assert plan(0).slot(1, 1).entries() == plan(0).slot(1, 1).entries()
    assignment = lambda p: [tuple(s) for s in p.slot_shards]  # noqa: E731
    assert len({tuple(assignment(plan(e))) for e in range(6)}) > 1  # shards move between workers
    # the shuffle buffer is a permutation that holds at most `buffer` items
    order = shuffle_order(50, 8, __import__("numpy").random.default_rng(0)).tolist()
    assert sorted(order) == list(range(50)) and order != list(range(50))
    assert all(order[k] < k + 8 for k in range(50))  # an emitted item was read at most 8 items earlier


def test_iterating_in_main_process_with_workers_is_refused(shards):
    stream = ShardStream(shards, "exact", 0, Topology(0, 1, 2), 2)
    with pytest.raises(RuntimeError, match="num_workers=2"):
        next(iter(stream))
    with pytest.raises(ValueError, match="num_workers=1"):
        StreamLoader(stream, num_workers=1)


@pytest.mark.slow
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_yield_the_rank_plan(shards, context):
    topology = Topology(1, 2, 2)
    expected = rank_batches(ShardStream(shards, "exact", 5, topology, 2))
    stream = ShardStream(shards, "exact", 5, topology, 2)
    loader = StreamLoader(stream, multiprocessing_context=context)
    assert isinstance(loader, _Stateful) and len(loader) == len(expected)
    assert loader_batches(loader) == expected


def test_tensors_cross_packed_in_one_buffer_and_come_back_equal(shards):
    # Workers pack images, ids, masks, labels and flags into one buffer; the loader unpacks them as they were.
    def collate(rows):
        n = len(rows)
        return {
            "image": torch.arange(n * 3 * 64 * 64).to(torch.uint8).view(n, 3, 64, 64),  # [B, 3, 64, 64]
            "text": torch.tensor([[len(r["txt"]), 7, -3] for r in rows]),  # [B, 3] int64
            "text_mask": torch.tensor([[True, False, True]] * n),  # [B, 3] bool
            "score": torch.linspace(-1, 1, n, dtype=torch.float64),  # [B]
            "valid": torch.tensor([r["valid"] for r in rows]),  # [B]
            "__key__": [r["__key__"] for r in rows],
        }

    topology = Topology(0, 1, 2)
    in_process = ShardStream(shards, "exact", 3, topology, 4, collate=collate)
    expected, iterators = [], [in_process.iter_worker(w) for w in (0, 1)]
    while iterators:  # round-robin over workers, as the DataLoader does
        batches = [(it, next(it, None)) for it in iterators]
        expected += [batch for _, batch in batches if batch is not None]
        iterators = [it for it, batch in batches if batch is not None]
    loader = StreamLoader(
        ShardStream(shards, "exact", 3, topology, 4, collate=collate), multiprocessing_context="fork"
    )
    got = list(loader)
    assert len(got) == len(expected) > 2
    packed = pack_tensors(expected[0])
    assert set(packed) == {"__key__", "__packed_tensors__"}  # every tensor crosses in one buffer
    for batch, want in zip(got, expected, strict=True):
        assert list(batch) == list(want)  # key order kept
        for key, value in want.items():
            if isinstance(value, torch.Tensor):
                assert batch[key].dtype == value.dtype and torch.equal(batch[key], value), key
            else:
                assert batch[key] == value


@pytest.mark.slow
@pytest.mark.parametrize("persistent", [False, True])
def test_epoch_changes_order_through_shared_value(shards, persistent):
    stream = ShardStream(shards, "exact", 0, Topology(0, 1, 2), 2)
    loader = StreamLoader(stream, persistent_workers=persistent, multiprocessing_context="fork")
    epoch0 = loader_batches(loader)
    _set_sampler_epoch(loader, 1)  # what Lightning's fit loop calls each epoch
    assert stream.epoch == 1
    epoch1 = loader_batches(loader)
    loader.set_epoch(0)
    again = loader_batches(loader)
    assert epoch0 != epoch1 and again == epoch0
    valid = lambda batches: sorted(k for ks, vs in batches for k, v in zip(ks, vs, strict=True) if v)  # noqa: E731
    assert valid(epoch0) == valid(epoch1) == sorted(all_keys())


def test_resampled_fixed_length_seeded_and_weighted(shards):
    per_rank = []
    orders = {}
    for rank in range(2):
        for epoch in range(2):
            stream = ShardStream(shards, "resampled", 0, Topology(rank, 2, 2), 4, samples_per_epoch=30)
            stream.set_epoch(epoch)
            for worker in range(2):
                batches = list(stream.iter_worker(worker))
                orders[rank, worker, epoch] = [k for b in batches for k in b["__key__"]]
                assert all(b["valid"].all() for b in batches)
            rows = sum(len(orders[rank, w, epoch]) for w in range(2))
            per_rank.append(rows)
    assert set(per_rank) == {math.ceil(30 / (4 * 4)) * 4 * 2}  # whole batches per slot, >= 30 in all
    assert len({tuple(v) for v in orders.values()}) == len(orders)  # every (rank, worker, epoch) differs
    same = ShardStream(shards, "resampled", 0, Topology(1, 2, 2), 4, samples_per_epoch=30)
    same.set_epoch(1)
    assert [k for b in same.iter_worker(0) for k in b["__key__"]] == orders[1, 0, 1]
    # weights: a zero-weight shard is never drawn, the others in proportion to their weight
    weights = [1.0, 0.0, 0.0, 0.0, 3.0]
    plan = plan_epoch(
        shards, "resampled", 1, 0, Topology(0, 1, 1), 8, samples_per_epoch=8000, weights=weights
    )
    draws = collections.Counter(plan.slot_shards[0])
    assert set(draws) == {0, 4}
    assert 2.6 < draws[4] / draws[0] < 3.4
    entries = plan.slot(0, 0).entries()
    assert {Path(url).name for url, _, _ in entries} == {"shard-00.tar", "shard-04.tar"}


@pytest.mark.slow
@pytest.mark.parametrize("consumed", [1, 3])
def test_resume_yields_exactly_the_remaining_batches(shards, consumed):
    topology = Topology(1, 2, 2)
    full = loader_batches(
        StreamLoader(ShardStream(shards, "exact", 7, topology, 2), multiprocessing_context="fork")
    )
    first_stream = ShardStream(shards, "exact", 7, topology, 2)
    first = StreamLoader(first_stream, multiprocessing_context="fork")
    head = loader_batches(first, limit=consumed)
    state = first.state_dict()
    assert state["batches_consumed"] == consumed and state["epoch"] == 0
    second = StreamLoader(ShardStream(shards, "exact", 7, topology, 2), multiprocessing_context="fork")
    second.load_state_dict(state)
    tail = loader_batches(second)
    assert head + tail == full  # same batches, same order, nothing twice
    assert second.state_dict()["batches_consumed"] == len(full)
    # a later pass of the same epoch starts over (the resume position is used once)
    assert loader_batches(second) == full


def test_resume_in_process_and_topology_change_refused(shards):
    topology = Topology(0, 2, 0)
    stream = ShardStream(shards, "exact", 7, topology, 2)
    full = rank_batches(stream)
    stream.begin_iteration()
    stream.mark_consumed(2)
    resumed = ShardStream(shards, "exact", 7, topology, 2)
    resumed.load_state_dict(stream.state_dict())
    assert rank_batches(resumed) == full[2:]
    # a finished epoch resumes at the start of the next one
    done = {**stream.state_dict(), "batches_consumed": len(full)}
    resumed.load_state_dict(done)
    assert resumed.epoch == 1
    # Lightning stores rank 0's state only: rank 1 of the same layout resumes its own remaining batches.
    rank1_full = rank_batches(ShardStream(shards, "exact", 7, Topology(1, 2, 0), 2))
    rank1 = ShardStream(shards, "exact", 7, Topology(1, 2, 0), 2)
    rank1.load_state_dict(stream.state_dict())
    assert rank_batches(rank1) == rank1_full[2:]
    # Both modes resume on another topology (tests/test_elastic_resume.py), but not from a state that
    # does not say what was consumed (an older xmodal's resampled state).
    resampled = lambda t: ShardStream(shards, "resampled", 7, t, 2, samples_per_epoch=8)  # noqa: E731
    old_state = {**resampled(topology).state_dict(), "version": 2}
    del old_state["consumed"]
    with pytest.raises(
        ValueError, match=r"saved .*\(0, 2, 0\), now \(0, 2, 1\) and it was saved by an older"
    ):
        resampled(Topology(0, 2, 1)).load_state_dict(old_state)
    with pytest.raises(ValueError, match="seed"):
        ShardStream(shards, "exact", 8, topology, 2).load_state_dict(stream.state_dict())


# Each tiny member takes 1024 bytes (header + data block). Cut inside member 3's data, the tar reader
# raises ShardError; cut inside its header, tarfile's stream mode ends quietly after fewer samples than
# sizes.json lists, which the stream must notice too.
@pytest.mark.parametrize("cut", [2648, 2148])
def test_bad_data_is_skipped_counted_and_padded(tmp_path, cut):
    shards = make_shards(tmp_path)
    broken = Path(shards[2].url)  # 5 samples
    broken.write_bytes(broken.read_bytes()[:cut])
    survivors = []
    try:
        for raw in iter_tar_samples(broken):
            survivors.append(raw["__key__"])
    except ShardError:
        pass
    lost = 5 - len(survivors)
    assert lost > 0

    def decode(raw):
        if raw["__key__"] == "s0-0003":
            raise ValueError("not an image")
        return {"text": raw["txt"].decode()}

    stream = ShardStream(shards, "exact", 0, Topology(0, 1, 0), 3, decode=decode)
    batches = list(iter(stream))
    assert len(batches) == len(stream)  # bad rows became padding: the batch count is unchanged
    valid = [k for b in batches for k, v in zip(b["__key__"], b["valid"].tolist(), strict=True) if v]
    expected = all_keys() - {"s0-0003"} - ({f"s2-{i:04d}" for i in range(5)} - set(survivors))
    assert sorted(valid) == sorted(expected)
    assert stream.skip_counts() == {shards[0].url: 1, str(broken): lost}
    assert stream.error_counts() == {shards[0].url: 1, str(broken): 1}
    assert sum(not v for b in batches for v in b["valid"].tolist()) == stream.plan().padding + lost + 1


def test_consecutive_failures_stop_naming_the_shard(shards):
    def decode(raw):
        if raw["__key__"].startswith("s0-") and raw["__key__"] != "s0-0000":
            raise ValueError("corrupt")
        return {"text": raw["txt"]}

    def stream(k, decoder=decode):  # tar order, so shard 0's six bad samples are consecutive
        return ShardStream(
            shards, "exact", 0, Topology(0, 1, 0), 2, decoder, shuffle_buffer=0, max_consecutive_failures=k
        )

    with pytest.raises(RuntimeError, match=r"3 consecutive data failures \(max.*shard-00\.tar: corrupt"):
        list(iter(stream(3)))
    tolerant = stream(7)
    assert len(list(iter(tolerant))) == len(tolerant)
    assert tolerant.skip_counts() == {shards[0].url: 6}

    def broken(raw):
        raise ValueError("corrupt")

    with pytest.raises(RuntimeError, match=r"consecutive data failures.*padding.*shard-0\d\.tar: corrupt"):
        list(iter(stream(3, broken)))


def test_plan_report_matches_the_stream_and_dumps_keys(tmp_path):
    make_shards(tmp_path)
    dump = tmp_path / "keys.txt"
    # Fractions 0: this data has a train split only, which a run (and plan, by default) would carve.
    uncarved = SplitSettings(val_fraction=0, test_fraction=0)
    report = plan_report(
        tmp_path,
        world_size=2,
        num_workers=2,
        batch_size=2,
        seed=4,
        epoch=1,
        dump_keys=dump,
        settings=uncarved,
    )
    lines = [line.split() for line in dump.read_text().splitlines()]
    shards = shards_from_dir(tmp_path, "train")
    for rank in range(2):
        stream = ShardStream(shards, "exact", 4, Topology(rank, 2, 2), 2)
        stream.set_epoch(1)
        batches = rank_batches(stream)
        assert report["ranks"][rank]["batches"] == len(batches) == len(stream)
        rows = [(k, int(v)) for keys, valid in batches for k, v in zip(keys, valid, strict=True)]
        assert [(key, int(valid)) for r, _, e, key, valid in lines if r == str(rank)] == rows
        assert all(e == "1" for _, _, e, _, _ in lines)
    assert report["batches_equal"] and report["duplicates"] == 0 and report["missing"] == 0
    assert sorted(key for *_, key, valid in lines if valid == "1") == sorted(all_keys())
    assert report["warnings"] and report["padding"] == sum(r["padding"] for r in report["ranks"])
    console = Console(file=io.StringIO(), width=200)
    print_plan(report, console)
    text = console.file.getvalue()
    assert "batches equal on all ranks: True" in text and "fewer than 4" in text


def test_raw_record_cache_is_bounded_by_the_shuffle_buffer(shards, monkeypatch):
    import xmodal.data.stream as stream_module

    peak = [0]
    get = stream_module._SlotReader.get

    def watched(self, s, i):
        record = get(self, s, i)
        peak[0] = max(peak[0], len(self.cache))
        return record

    monkeypatch.setattr(stream_module._SlotReader, "get", watched)
    stream = ShardStream(shards, "exact", 0, Topology(0, 1, 0), 3, shuffle_buffer=4)
    keys = [k for b in stream for k, v in zip(b["__key__"], b["valid"].tolist(), strict=True) if v]
    assert sorted(keys) == sorted(all_keys()) and keys != sorted(keys)
    assert 0 < peak[0] <= 4


@pytest.mark.slow
def test_lightning_trainer_resumes_mid_epoch_with_the_remaining_batches(shards, tmp_path):
    import lightning as L
    import torch

    seen: list[tuple[int, tuple[str, ...]]] = []

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, index):
            seen.append((self.current_epoch, tuple(batch["__key__"])))
            return (self.w**2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def loader():
        stream = ShardStream(shards, "exact", 0, Topology(0, 1, 2), 2, drop_last=True)
        return StreamLoader(stream, multiprocessing_context="fork", persistent_workers=True)

    common = dict(
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=tmp_path,
    )
    every3 = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1
    )
    L.Trainer(callbacks=[every3], **common).fit(Model(), loader())
    full = list(seen)
    assert len(full) == 2 * len(loader()) and full[: len(full) // 2] != full[len(full) // 2 :]
    seen.clear()
    L.Trainer(**common).fit(Model(), loader(), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    assert seen == full[3:]  # the rest of epoch 0 in its order, then the same epoch 1
