"""The epoch plan: which samples each (rank, worker) slot reads, in which order — a pure function.

This is the first layer of the streaming contract (docs/ARCHITECTURE.md "Data"); ``xmodal.data.stream``
realises a plan, ``xmodal.data.loader`` hands its batches to Lightning.

``plan_epoch(...)`` → ``EpochPlan``: a pure function of (shard sizes, mode, seed, epoch, topology,
batch size). It says, for every (rank, worker) *slot*, which shards the slot reads, in which order it
yields their samples, and which rows are padding. No tar is opened, so it is cheap to test.

Topology. ``Topology(rank, world_size, num_workers)`` is computed in the main process after the
process group exists and passed in; nothing here reads ``torch.distributed`` (spawned workers cannot see
it). ``num_workers=0`` means the main process is the only worker. Slot ``s = rank * W + worker`` with
``W = max(num_workers, 1)``.

Modes.

- ``exact``: a global shard permutation seeded by ``(seed, epoch)`` (the same on every rank), then
  shards are assigned to slots largest-first onto the least-loaded slot (ties: earlier in the
  permutation, and an epoch-seeded relabelling of the slots, so the shard → worker assignment changes
  between epochs). Every real sample appears exactly once per epoch over all slots. Each slot is then
  padded with rows marked ``valid=False`` up to the same whole number of batches (``drop_last=False``,
  evaluation), or trimmed to the smallest slot's whole batches (``drop_last=True``, training: the
  trimmed samples are counted in ``EpochPlan.dropped``). Every rank therefore runs the same number of
  batches, so collectives never wait on a rank that has finished.
- ``resampled``: each slot draws shards with replacement (optionally weighted), seeded by
  ``(seed, rank, worker, epoch)``, and yields ``ceil(samples_per_epoch / (slots * batch_size))``
  batches: a fixed epoch length, every row valid.

Order within a slot: the slot's shards are read sequentially (in permutation order) and their raw
records go through a shuffle buffer of ``shuffle_buffer`` records seeded by ``(seed, epoch, slot)``
(deterministic, different each epoch; ``shuffle_buffer <= 1`` keeps tar order). The buffer is simulated
on indices inside the plan, so the order is known without reading data, and the stream holds at most
``shuffle_buffer`` raw (undecoded) records: decoding happens after shuffling.
"""

from __future__ import annotations

import heapq
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xmodal.data.shards import split_shard_sizes

MODES = ("exact", "resampled")


@dataclass(frozen=True)
class Topology:
    """Data-parallel layout, computed in the main process (after process-group init) and passed in.

    ``num_workers`` is the DataLoader's; 0 means the main process acts as the single worker.
    """

    rank: int
    world_size: int
    num_workers: int

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.num_workers < 0:
            raise ValueError(f"invalid topology {self}: need 0 <= rank < world_size and num_workers >= 0")

    @property
    def workers(self) -> int:
        """Worker slots per rank (at least 1)."""
        return max(self.num_workers, 1)

    @property
    def slots(self) -> int:
        return self.world_size * self.workers


@dataclass(frozen=True)
class ShardInfo:
    url: str
    num_samples: int
    keep: tuple[float, float] | None = None
    """A carved split's key-hash range (``xmodal.data.carve``): the shard's records outside it belong
    to another split and are passed over; ``num_samples`` counts the records kept."""


def shards_from_dir(shard_dir: str | os.PathLike[str], split: str) -> list[ShardInfo]:
    """The shards of ``split`` with their sizes from ``sizes.json`` (sorted by file name)."""
    return [ShardInfo(url, n) for url, n in split_shard_sizes(shard_dir, split)]


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(p) & (2**64 - 1) for p in parts]))


def shuffle_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Output order of a shuffle buffer of ``buffer`` items fed ``0..n-1`` (``n <= buffer``: a permutation).

    Fill the buffer, then for every further item emit a random buffered one and put the new one in its
    place; at the end emit the rest in random order. Every emitted item was read before it is emitted
    and at most ``buffer`` items are held, which bounds the stream's raw-record cache.
    """
    if buffer <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    if n <= buffer:
        return rng.permutation(n).astype(np.int64)
    picks = rng.integers(0, buffer, size=n - buffer).tolist()
    held = list(range(buffer))
    out: list[int] = []
    for new, j in zip(range(buffer, n), picks, strict=True):
        out.append(held[j])
        held[j] = new
    out.extend(held[k] for k in rng.permutation(buffer))
    return np.asarray(out, dtype=np.int64)


@dataclass(frozen=True)
class SlotPlan:
    """What one (rank, worker) slot yields in one epoch.

    Row ``k`` is sample ``index[k]`` (position in tar order) of shard ``shards[shard[k]]``, or a padding
    row when ``shard[k] == -1`` (``valid[k]`` is False exactly for those). ``len(shard)`` is always
    ``batches * batch_size``. ``shards`` may repeat a URL (resampled mode): positions are occurrences.
    """

    rank: int
    worker: int
    shards: tuple[str, ...]
    sizes: tuple[int, ...]
    shard: np.ndarray  # int64 [rows]
    index: np.ndarray  # int64 [rows]
    valid: np.ndarray  # bool  [rows]
    batches: int

    def entries(self) -> list[tuple[str | None, int, bool]]:
        """Rows as ``(shard url or None for padding, index in shard, valid)``."""
        return [
            (self.shards[s] if s >= 0 else None, int(i), bool(v))
            for s, i, v in zip(self.shard.tolist(), self.index.tolist(), self.valid.tolist(), strict=True)
        ]


@dataclass
class EpochPlan:
    """The epoch of every (rank, worker) slot. Counts are eager; row orders are built per slot on demand.

    ``batches_per_rank`` and ``samples_per_rank`` (rows, padding included) are the same on every rank;
    ``valid_per_rank`` counts real rows. ``padding``/``dropped`` are totals over all slots (``dropped``:
    samples trimmed by ``drop_last=True``). ``warnings`` are human-readable layout problems.
    """

    mode: str
    seed: int
    epoch: int
    topology: Topology
    batch_size: int
    shuffle_buffer: int
    batches_per_slot: int
    slot_shards: list[list[int]]  # per slot: positions into ``shard_list`` in reading order
    slot_rows: list[int]  # per slot: real rows (before padding)
    shard_list: tuple[ShardInfo, ...]
    warnings: list[str] = field(default_factory=list)
    padding: int = 0
    dropped: int = 0
    _cache: dict[int, SlotPlan] = field(default_factory=dict, repr=False)

    @property
    def batches_per_rank(self) -> int:
        return self.batches_per_slot * self.topology.workers

    @property
    def samples_per_rank(self) -> int:
        return self.batches_per_rank * self.batch_size

    @property
    def valid_per_rank(self) -> list[int]:
        w = self.topology.workers
        return [sum(self.slot_rows[r * w : (r + 1) * w]) for r in range(self.topology.world_size)]

    def slot(self, rank: int, worker: int) -> SlotPlan:
        """The ordered rows of slot (rank, worker); ``worker`` counts from 0 even when num_workers=0."""
        if not (0 <= rank < self.topology.world_size and 0 <= worker < self.topology.workers):
            raise ValueError(f"no slot (rank={rank}, worker={worker}) in {self.topology}")
        s = rank * self.topology.workers + worker
        if s not in self._cache:
            self._cache[s] = self._build_slot(rank, worker, s)
        return self._cache[s]

    def _build_slot(self, rank: int, worker: int, s: int) -> SlotPlan:
        shards = [self.shard_list[p] for p in self.slot_shards[s]]
        sizes = np.asarray([sh.num_samples for sh in shards], dtype=np.int64)
        total = int(sizes.sum())
        if self.mode == "exact":
            order = shuffle_order(total, self.shuffle_buffer, _rng(self.seed, self.epoch, 2, s))
        else:
            order = shuffle_order(total, self.shuffle_buffer, _rng(self.seed, 4, rank, worker, self.epoch))
        order = order[: self.slot_rows[s]]  # drop_last trim / resampled epoch length
        starts = np.concatenate([[0], np.cumsum(sizes)])[:-1]
        shard_pos = np.searchsorted(starts, order, side="right") - 1
        index = order - starts[shard_pos] if len(order) else order
        rows = self.batches_per_slot * self.batch_size
        pad = rows - len(order)
        return SlotPlan(
            rank=rank,
            worker=worker,
            shards=tuple(sh.url for sh in shards),
            sizes=tuple(int(n) for n in sizes),
            shard=np.concatenate([shard_pos, np.full(pad, -1)]).astype(np.int64),
            index=np.concatenate([index, np.full(pad, -1)]).astype(np.int64),
            valid=np.arange(rows) < len(order),
            batches=self.batches_per_slot,
        )


def plan_epoch(
    shards: Sequence[ShardInfo],
    mode: str,
    seed: int,
    epoch: int,
    topology: Topology,
    batch_size: int,
    samples_per_epoch: int | None = None,
    weights: Sequence[float] | None = None,
    drop_last: bool = False,
    shuffle_buffer: int = 1000,
) -> EpochPlan:
    """The epoch plan (see the module docstring). Pure: the same inputs give the same plan anywhere.

    ``samples_per_epoch`` (global, resampled mode only) is spread evenly over the slots and rounded up
    to whole batches per slot. ``weights`` (resampled only): one non-negative weight per shard, the
    relative probability of drawing it. ``drop_last`` (exact only): trim instead of pad.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shards = tuple(shards)
    if not shards:
        raise ValueError("no shards to stream")
    slots, workers = topology.slots, topology.workers
    sizes = [sh.num_samples for sh in shards]
    common: dict[str, Any] = dict(
        mode=mode,
        seed=seed,
        epoch=epoch,
        topology=topology,
        batch_size=batch_size,
        shard_list=shards,
        shuffle_buffer=shuffle_buffer,
    )
    if mode == "resampled":
        if samples_per_epoch is None or samples_per_epoch < 1:
            raise ValueError("resampled mode needs samples_per_epoch >= 1 (global samples per epoch)")
        if drop_last:
            raise ValueError("drop_last applies to exact mode only (resampled epochs are whole batches)")
        p = _shard_probabilities(sizes, weights)
        per_slot = math.ceil(samples_per_epoch / (slots * batch_size))
        rows = per_slot * batch_size
        slot_shards = []
        for rank in range(topology.world_size):
            for worker in range(workers):
                rng = _rng(seed, 3, rank, worker, epoch)
                drawn: list[int] = []
                total = 0
                while total < rows:  # draw in chunks; keep only what is needed
                    for pos in rng.choice(len(shards), size=max(8, rows // max(min(sizes), 1)), p=p).tolist():
                        if total >= rows:
                            break
                        drawn.append(pos)
                        total += sizes[pos]
                slot_shards.append(drawn)
        return EpochPlan(
            batches_per_slot=per_slot, slot_shards=slot_shards, slot_rows=[rows] * slots, **common
        )

    if weights is not None or samples_per_epoch is not None:
        raise ValueError("weights and samples_per_epoch apply to resampled mode only")
    if sum(sizes) == 0:
        raise ValueError("the shards hold no samples (sizes.json says 0 for every shard)")
    perm = _rng(seed, epoch, 0).permutation(len(shards)).tolist()
    labels = _rng(seed, epoch, 1).permutation(slots).tolist()  # greedy bin -> slot, new each epoch
    heap = [(0, b) for b in range(slots)]
    bins: list[list[int]] = [[] for _ in range(slots)]
    for rank_in_perm, pos in sorted(enumerate(perm), key=lambda t: (-sizes[t[1]], t[0])):
        load, b = heapq.heappop(heap)
        bins[b].append(rank_in_perm)
        heapq.heappush(heap, (load + sizes[pos], b))
    slot_shards = [[] for _ in range(slots)]
    for b, members in enumerate(bins):
        slot_shards[labels[b]] = [perm[k] for k in sorted(members)]  # read in permutation order
    loads = [sum(sizes[p] for p in members) for members in slot_shards]
    if drop_last:
        per_slot = min(loads) // batch_size
        slot_rows = [per_slot * batch_size] * slots
    else:
        per_slot = max(math.ceil(n / batch_size) for n in loads)
        slot_rows = loads
    plan = EpochPlan(batches_per_slot=per_slot, slot_shards=slot_shards, slot_rows=slot_rows, **common)
    plan.padding = per_slot * batch_size * slots - sum(slot_rows)
    plan.dropped = sum(loads) - sum(slot_rows)
    layout = f"{topology.world_size} rank(s) x {workers} worker(s) = {slots} slots"
    if len(shards) < slots:
        what = (
            "yield only padding rows" if not drop_last else "leave every slot empty: the epoch has 0 batches"
        )
        plan.warnings.append(
            f"{len(shards)} shards for {layout}: {slots - len(shards)} slots read no shard and {what}; "
            "write more, smaller shards or use fewer workers"
        )
    elif len(shards) < 4 * slots:
        plan.warnings.append(
            f"{len(shards) / slots:.1f} shards per worker for {layout} (fewer than 4): slot sizes are uneven "
            "(more padding or dropped samples) and batches mix few shards; write more, smaller shards"
        )
    if drop_last and per_slot == 0:
        plan.warnings.append(
            f"drop_last: the smallest slot has fewer than batch_size={batch_size} samples, so the epoch is empty"
        )
    return plan


def _shard_probabilities(sizes: list[int], weights: Sequence[float] | None) -> np.ndarray:
    w = np.ones(len(sizes)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(sizes),) or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be {len(sizes)} finite non-negative numbers (one per shard)")
    w = np.where(np.asarray(sizes) > 0, w, 0.0)  # an empty shard can never fill a batch
    if w.sum() <= 0:
        raise ValueError("no shard with samples has a positive weight")
    return w / w.sum()
