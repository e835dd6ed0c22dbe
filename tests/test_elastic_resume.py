"""Elastic resume: an exact epoch saved on one topology finishes on another, every sample exactly once."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from tests.conftest import make_tar
from xmodal.config import compose_config
from xmodal.data.epoch_plan import ShardInfo, Topology
from xmodal.data.stream import ShardStream
from xmodal.factory import build_datamodule, prepare_data

SIZES = (7, 3, 5, 2, 4, 9, 1, 6)  # uneven: slots hold different counts, blocks straddle shards
SEED, BATCH, BUFFER = 6, 2, 4  # seed 6: both saved states hold extra indices


def write_shards(root: Path) -> list[ShardInfo]:
    """Plain tars as any tar tool writes them (one ``.txt`` member per sample) and a sizes.json."""
    shards = []
    for k, n in enumerate(SIZES):
        members = [(f"s{k}-{i:02d}.txt", f"caption {k} {i}".encode()) for i in range(n)]
        shards.append(ShardInfo(str(make_tar(root / f"shard-{k:02d}.tar", members)), n))
    (root / "sizes.json").write_text(json.dumps({p.url: p.num_samples for p in shards}))
    return shards


ALL_KEYS = collections.Counter(f"s{k}-{i:02d}" for k, n in enumerate(SIZES) for i in range(n))


def stream(shards, topology: Topology, drop_last: bool = False) -> ShardStream:
    return ShardStream(shards, "exact", SEED, topology, BATCH, drop_last=drop_last, shuffle_buffer=BUFFER)


def take(s: ShardStream, limit: int | None = None) -> list[list[str]]:
    """A rank's next ``limit`` batches (all with None) as its DataLoader hands them out: workers
    round-robin. Each batch as its valid keys."""
    s.begin_iteration()
    iterators = [s.iter_worker(w) for w in range(s.topology.workers)]
    out: list[list[str]] = []
    while iterators and (limit is None or len(out) < limit):
        alive = []
        for it in iterators:
            if limit is not None and len(out) == limit:
                break
            batch = next(it, None)
            if batch is not None:
                out.append([k for k, v in zip(batch["__key__"], batch["valid"].tolist(), strict=True) if v])
                alive.append(it)
        iterators = alive
    return out


def run_ranks(streams: list[ShardStream], limit: int | None, seen: collections.Counter) -> list[int]:
    """Every rank's next batches; rank 0 reports its count (Lightning saves rank 0's state only)."""
    counts = []
    for s in streams:
        batches = take(s, limit)
        counts.append(len(batches))
        for keys in batches:
            seen.update(keys)
    streams[0].mark_consumed(counts[0])
    return counts


@pytest.mark.parametrize("drop_last", [False, True])
def test_two_ranks_then_one_then_three_see_every_sample_once(tmp_path, drop_last):
    shards = write_shards(tmp_path)
    seen: collections.Counter = collections.Counter()
    two = [stream(shards, Topology(r, 2, 2), drop_last) for r in range(2)]
    for s in two:
        s.set_epoch(1)
    assert run_ranks(two, 3, seen) == [3, 3]
    state = two[0].state_dict()
    # Named by shard, not by slot, and compact: a prefix per shard plus at most a block per slot.
    assert set(state["consumed"]) == {"prefix_shards", "prefix_counts", "extra_shards", "extra_indices"}
    assert 0 < len(state["consumed"]["extra_indices"]) <= 4 * (BUFFER - 1)
    assert sum(state["consumed"]["prefix_counts"]) + len(state["consumed"]["extra_indices"]) == sum(
        seen.values()
    )

    one = stream(shards, Topology(0, 1, 0), drop_last)
    one.load_state_dict(state)
    assert one.epoch == 1
    rest_on_one = take(stream_loaded(shards, Topology(0, 1, 0), state, drop_last))  # its whole rest
    assert len(one) == 3 + len(rest_on_one)  # the trainer's batch counter goes on from 3
    assert run_ranks([one], 4, seen) == [4]
    state = one.state_dict()
    assert state["batches_consumed"] == 7 and state["consumed"]["extra_indices"]
    # Resuming the rest-of-epoch plan on the same topology continues it batch for batch.
    again = stream_loaded(shards, Topology(0, 1, 0), state, drop_last)
    assert take(again) == rest_on_one[4:]

    three = [stream_loaded(shards, Topology(r, 3, 1), state, drop_last) for r in range(3)]
    counts = run_ranks(three, None, seen)
    assert len(set(counts)) == 1 and counts[0] > 0  # equal batches per rank: no collective waits
    assert all(len(s) == 7 + counts[0] for s in three)
    assert max(seen.values()) == 1  # never twice
    if drop_last:
        assert set(seen) < set(ALL_KEYS)
        assert sum(seen.values()) == sum(ALL_KEYS.values()) - three[0].plan().dropped
    else:
        assert seen == ALL_KEYS  # every sample of the epoch exactly once over the three topologies
    assert three[0].state_dict()["batches_consumed"] == 7 + counts[0]

    # The next epoch is whole again, on the new topology.
    nxt: collections.Counter = collections.Counter()
    for s in three:
        s.set_epoch(2)
    counts = run_ranks(three, None, nxt)
    assert len(set(counts)) == 1 and all(len(s) == counts[0] for s in three)
    assert max(nxt.values()) == 1
    assert sum(nxt.values()) == sum(ALL_KEYS.values()) - three[0].plan().dropped
    assert drop_last or nxt == ALL_KEYS


def resampled(shards, topology: Topology) -> ShardStream:
    return ShardStream(
        shards, "resampled", SEED, topology, BATCH, shuffle_buffer=BUFFER, samples_per_epoch=40
    )


def test_a_resampled_epoch_resumed_on_another_topology_draws_only_its_remaining_rows(tmp_path):
    shards = write_shards(tmp_path)
    seen: collections.Counter = collections.Counter()
    two = [resampled(shards, Topology(r, 2, 2)) for r in range(2)]
    assert len(two[0]) == 10  # ceil(40 / (4 slots x 2)) = 5 batches per slot, 2 slots per rank
    assert run_ranks(two, 3, seen) == [3, 3]
    state = two[0].state_dict()
    assert state["consumed"] == {"drawn": 12}  # 3 batches x 2 rows x 2 ranks

    one = resampled(shards, Topology(0, 1, 0))
    one.load_state_dict(state)
    assert len(one) == 3 + 14  # the trainer's counter goes on from 3; 40 - 12 = 28 rows = 14 batches
    rest = take(one)
    assert len(rest) == 14 and all(len(keys) == BATCH for keys in rest)  # every row drawn is real
    assert set(k for keys in rest for k in keys) <= set(ALL_KEYS)
    again = resampled(shards, Topology(0, 1, 0))
    again.load_state_dict(state)
    assert take(again) == rest  # seeded: the same state draws the same rest
    fresh = resampled(shards, Topology(0, 1, 0))
    assert take(fresh)[:14] != rest  # drawn apart from the epoch's first draws
    # One rank takes the whole global batch (data.batch_size / world size): 28 rows = 7 batches of 4.
    wide = ShardStream(shards, "resampled", SEED, Topology(0, 1, 0), 2 * BATCH, samples_per_epoch=40)
    wide.load_state_dict(state)
    assert len(wide) == 3 + 7 and all(len(keys) == 2 * BATCH for keys in take(wide))
    with pytest.raises(ValueError, match="saved batch_size=2, now 4"):  # the same layout: no
        ShardStream(shards, "resampled", SEED, Topology(0, 2, 2), 4, samples_per_epoch=40).load_state_dict(
            state
        )

    one = resampled(shards, Topology(0, 1, 0))
    one.load_state_dict(state)
    assert run_ranks([one], 4, collections.Counter()) == [4]
    state = one.state_dict()
    assert state["consumed"] == {"drawn": 12 + 4 * BATCH}
    three = [resampled(shards, Topology(r, 3, 1)) for r in range(3)]
    for s in three:
        s.load_state_dict(state)
    counts = run_ranks(three, None, collections.Counter())
    assert counts == [4, 4, 4]  # ceil((40 - 20) / (3 slots x 2)) on every rank: no collective waits
    assert all(len(s) == 7 + 4 for s in three)
    for s in three:  # the next epoch is whole again, on the new topology
        s.set_epoch(1)
    assert [len(s) for s in three] == [7, 7, 7] and three[0].plan().consumed is None  # ceil(40 / 6)


def stream_loaded(shards, topology: Topology, state: dict, drop_last: bool) -> ShardStream:
    s = stream(shards, topology, drop_last)
    s.load_state_dict(state)
    return s


def test_a_finished_epoch_resumes_at_the_next_and_a_changed_index_is_refused(tmp_path):
    shards = write_shards(tmp_path)
    two = [stream(shards, Topology(r, 2, 0)) for r in range(2)]
    run_ranks(two, None, collections.Counter())
    done = stream_loaded(shards, Topology(0, 3, 2), two[0].state_dict(), False)
    assert done.epoch == 1 and len(done) == done.plan(1).batches_per_rank  # whole, not a rest
    other = [*shards[:-1], ShardInfo(shards[-1].url, SIZES[-1] - 1)]
    with pytest.raises(ValueError, match=r"saved for an index of 8 shards / 37 samples, this one has 8 / 36"):
        stream(other, Topology(0, 1, 0)).load_state_dict(two[0].state_dict())


def test_a_resumed_fit_builds_its_train_loader_already_resumed(tiny):
    # Lightning sizes the epoch from len(train_dataloader()) before it loads the loader's state, so
    # the datamodule (restored first) hands the stream its state when it builds the loader.
    cfg = compose_config(tiny)
    saving = build_datamodule(cfg, prepare_data(cfg))
    saving.setup("fit")
    assert saving.state_dict() == {}  # no train loader yet: nothing to save
    loader = saving.loader("train", Topology(0, 2, 0))
    for _ in zip(range(2), loader, strict=False):
        pass
    state = saving.state_dict()
    assert state["train_stream"]["batches_consumed"] == 2

    resumed = build_datamodule(cfg, prepare_data(cfg))
    resumed.setup("fit")
    resumed.load_state_dict(state)
    loader = resumed.loader("train", Topology(0, 3, 0))
    rest = resumed.streams["train"].plan()
    assert rest.consumed is not None  # the rest of the epoch, not a fresh one
    assert len(loader) == 2 + rest.batches_per_rank == 2 + len(list(loader))
    assert resumed.loader("train", Topology(0, 3, 0)).dataset.plan().consumed is None  # used once
