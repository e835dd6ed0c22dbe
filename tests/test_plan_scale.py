"""Epoch plans cost O(shards), not O(samples): memory measured, and the lazy row order checked."""

from __future__ import annotations

import itertools
import tracemalloc

import pytest

from xmodal.data.epoch_plan import ShardInfo, Topology, plan_epoch

BATCH = 64


def plan_peak(num_shards: int, per_shard: int) -> int:
    """Peak bytes traced while planning an epoch (1 rank x 2 workers) and taking slot 0's first batch
    of rows. The index (the input) is built before tracing starts."""
    shards = [ShardInfo(f"/data/shard-{k:06d}.tar", per_shard) for k in range(num_shards)]
    tracemalloc.start()
    try:
        plan = plan_epoch(shards, "exact", 0, 3, Topology(0, 1, 2), BATCH)
        rows = list(itertools.islice(plan.slot(0, 0).iter_rows(), BATCH))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(rows) == BATCH and all(valid for _, _, valid in rows)
    assert plan.batches_per_rank == -(-num_shards * per_shard // (2 * BATCH)) * 2
    return peak


def test_plan_memory_does_not_grow_with_the_samples():
    plan_peak(8, 768)  # warm-up: numpy's first allocations are not the plan's
    small = plan_peak(8, 768)
    large = plan_peak(10_000, 768)  # 7.68 M samples: 3.84 M rows per slot
    deeper = plan_peak(10_000, 76_800)  # 100x the samples, same shards
    # The old plan built a slot's whole row order: ~250 bytes per row, about 1 GB here. Now what is
    # left grows with the shard count only (a few 8-byte arrays per shard) and not at all with the
    # samples per shard.
    assert large < 16 * small, (small, large)
    assert large < 100 * 10_000, large
    assert deeper < 1.1 * large, (large, deeper)


@pytest.mark.parametrize(("block", "drop_last"), [(4, False), (5, True), (1, False)])
def test_rows_are_computed_block_by_block_and_resume_anywhere(block, drop_last):
    sizes = (7, 3, 5, 2, 4, 9, 1)
    shards = [ShardInfo(f"s{k}", n) for k, n in enumerate(sizes)]
    plan = plan_epoch(shards, "exact", 1, 2, Topology(1, 2, 2), 3, drop_last=drop_last, shuffle_buffer=block)
    seen = []
    for worker in (0, 1):
        slot = plan.slot(1, worker)
        rows = list(slot.iter_rows())
        assert len(rows) == slot.rows == plan.batches_per_slot * 3
        for start in range(len(rows) + 1):  # resume at any row gives the same remaining rows
            assert list(slot.iter_rows(start)) == rows[start:]
        stream = [(p, i) for p in range(len(slot.shards)) for i in range(slot.sizes[p])]  # reading order
        for k, (piece, index, valid) in enumerate(rows):
            if valid:  # the record of row k lies in row k's block of the reading order
                assert k // block == stream.index((piece, index)) // block
        seen += [(slot.shards[p], i) for p, i, v in rows if v]
    assert len(seen) == len(set(seen))
    if block > 1:
        assert [row[:2] for row in rows if row[2]] != sorted(row[:2] for row in rows if row[2])
