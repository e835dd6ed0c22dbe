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

Order within a slot: the slot's *stream* is its shards' records in reading order (permutation order;
each shard in tar order). It is cut into blocks of ``shuffle_buffer`` records, and each block is yielded
in a permutation seeded by ``(seed, epoch, slot, block)`` (deterministic, different each epoch;
``shuffle_buffer <= 1`` keeps tar order). Nothing of the size of the epoch is built: a slot's row order
is computed block by block as it is read (``SlotPlan.iter_blocks``), so a plan costs O(shards) memory and
time, whatever the shards hold, and row ``k`` of a slot is found without the rows before it (resume).
The stream holds at most one block of raw (undecoded) records: decoding happens after shuffling.

Consumption. Because a slot reads each shard front to back, the samples a slot has yielded after ``m``
rows are: its whole blocks before row ``m`` (a prefix of each shard, by tar order) plus part of one
block. ``EpochPlan.consumed_after(batches)`` states them by shard (``Consumed``: a consumed prefix per
shard plus a few extra indices), not by slot; ``plan_epoch(..., consumed=...)`` plans the *rest* of an
epoch over any topology (elastic resume, ``xmodal.data.stream``): each partly read shard becomes a
*piece* that starts after its prefix and passes over its extra indices. A resampled epoch has no
sample set, only a length: ``Drawn`` counts its rows drawn so far, and the rest of it is drawn afresh
over the new topology.
"""

from __future__ import annotations

import heapq
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from xmodal.data.shards import split_shard_sizes

MODES = ("exact", "resampled")
_CHUNK = 1024  # rows per chunk when there is no shuffle (tar order): bounds the row lists built at once
Row = tuple[int, int, bool]
"""``(piece, index in shard, valid)``; ``piece == -1`` (and ``valid`` False) for a padding row."""


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
    """Output order of a block shuffle of ``0..n-1``: blocks of ``buffer`` items, each permuted.

    ``n <= buffer`` is one permutation. Item ``order[k]`` lies in the block of ``k``, so it is read at
    most ``buffer - 1`` items ahead of its row, which bounds the stream's raw-record cache.
    """
    if buffer <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    return np.concatenate(
        [start + rng.permutation(min(buffer, n - start)) for start in range(0, n, buffer)]
    ).astype(np.int64)


@dataclass(frozen=True)
class Consumed:
    """Samples of one exact-mode epoch already yielded, by shard (positions in the shard list).

    Shard ``k``'s first ``prefix[k]`` records (tar order, counting a carved split's kept records) are
    consumed, and so are its indices ``extra[k]`` (sorted, each ``>= prefix[k]``): what one partly
    yielded shuffle block per slot leaves behind. Independent of the topology that consumed them.
    """

    prefix: np.ndarray  # int64 [shards]
    extra: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def remaining(self, sizes: np.ndarray) -> np.ndarray:
        """Samples left per shard: int64 [shards]."""
        left = np.asarray(sizes, dtype=np.int64) - self.prefix
        for k, indices in self.extra.items():
            left[k] -= len(indices)
        return left

    def to_state(self) -> dict[str, list[int]]:
        """Plain lists (a checkpoint loads them with ``weights_only``): nonzero prefixes, extra pairs."""
        nonzero = np.flatnonzero(self.prefix)
        pairs = [(k, i) for k, indices in sorted(self.extra.items()) for i in indices]
        return {
            "prefix_shards": nonzero.tolist(),
            "prefix_counts": self.prefix[nonzero].tolist(),
            "extra_shards": [k for k, _ in pairs],
            "extra_indices": [i for _, i in pairs],
        }

    @classmethod
    def from_state(cls, state: dict[str, list[int]], sizes: np.ndarray) -> Consumed:
        """Inverse of ``to_state`` for an index of ``len(sizes)`` shards (ValueError if it does not fit)."""
        prefix = np.zeros(len(sizes), dtype=np.int64)
        shards = np.asarray(state["prefix_shards"], dtype=np.int64)
        counts = np.asarray(state["prefix_counts"], dtype=np.int64)
        extra: dict[int, list[int]] = {}
        for k, i in zip(state["extra_shards"], state["extra_indices"], strict=True):
            extra.setdefault(int(k), []).append(int(i))
        within = np.all((shards >= 0) & (shards < len(sizes))) and all(0 <= k < len(sizes) for k in extra)
        if not within or np.any(counts > np.asarray(sizes)[shards] if len(shards) else False):
            raise ValueError("the saved consumed samples do not fit this index")
        prefix[shards] = counts
        return _normalised(prefix, extra, sizes)


@dataclass(frozen=True)
class Drawn:
    """Rows of one resampled epoch already drawn, over all slots. A resampled epoch has no sample set
    to complete, only a length (``samples_per_epoch``), so this count is all an elastic resume needs:
    the rest of the epoch draws the remaining rows afresh over the new topology."""

    rows: int

    def to_state(self) -> dict[str, int]:
        return {"drawn": int(self.rows)}

    @classmethod
    def from_state(cls, state: dict[str, int]) -> Drawn:
        rows = int(state["drawn"])
        if rows < 0:
            raise ValueError("the saved drawn rows are negative")
        return cls(rows)


def consumed_from_state(mode: str, state: dict[str, Any], sizes: np.ndarray) -> Consumed | Drawn:
    """A saved ``Consumed`` (exact) or ``Drawn`` (resampled) for an index with these shard sizes."""
    return Drawn.from_state(state) if mode == "resampled" else Consumed.from_state(state, sizes)


def _normalised(prefix: np.ndarray, extra: dict[int, Any], sizes: np.ndarray) -> Consumed:
    """Extras at or below a shard's prefix dropped; extras continuing the prefix folded into it."""
    out: dict[int, tuple[int, ...]] = {}
    for k, indices in extra.items():
        rest = sorted(i for i in set(indices) if i >= prefix[k])
        while rest and rest[0] == prefix[k]:  # a run right after the prefix is part of it
            prefix[k] += 1
            rest.pop(0)
        if rest:
            if rest[-1] >= sizes[k]:
                raise ValueError(f"consumed index {rest[-1]} is past shard {k}'s {sizes[k]} samples")
            out[k] = tuple(rest)
    return Consumed(prefix, out)


@dataclass(frozen=True)
class SlotPlan:
    """What one (rank, worker) slot yields in one epoch, computed block by block as it is read.

    The slot reads *pieces* in order: piece ``j`` is shard ``shards[j]`` (``sizes[j]`` records) from
    index ``starts[j]`` on, passing over ``skips.get(j, ())`` (indices consumed before an elastic
    resume; a fresh epoch starts every piece at 0 and skips nothing). ``shards`` may repeat a URL (resampled
    mode): positions are occurrences. The slot yields ``batches * batch_size`` rows: the first
    ``valid_rows`` are real, the rest padding.
    """

    rank: int
    worker: int
    shards: tuple[str, ...]
    sizes: np.ndarray  # int64 [pieces]
    starts: np.ndarray  # int64 [pieces]
    skips: dict[int, tuple[int, ...]]  # piece -> sorted indices passed over
    valid_rows: int
    batches: int
    batch_size: int
    block: int  # shuffle block length (1: tar order)
    seed_parts: tuple[int, ...]  # with the block number, seeds the block's permutation

    @property
    def rows(self) -> int:
        return self.batches * self.batch_size

    @cached_property
    def piece_rows(self) -> np.ndarray:
        """Records each piece yields: int64 [pieces]."""
        rows = self.sizes - self.starts
        for j, skip in self.skips.items():
            rows[j] -= len(skip)
        return rows

    def _walk(self, position: int) -> Iterator[tuple[int, int]]:
        """``(piece, index)`` of the slot's stream from stream position ``position`` on."""
        ends = np.cumsum(self.piece_rows)
        j = int(np.searchsorted(ends, position, side="right"))
        offset = position - (int(ends[j - 1]) if j else 0)
        for piece in range(j, len(self.shards)):
            skip = self.skips.get(piece, ())
            index = int(self.starts[piece])
            for s in skip:  # the offset-th index not skipped (skips are sorted)
                if s <= index + offset:
                    offset += 1
            index += offset
            offset = 0
            skipped = set(skip)
            for i in range(index, int(self.sizes[piece])):
                if i not in skipped:
                    yield piece, i

    def _order(self, block: int, length: int) -> np.ndarray:
        if self.block <= 1:
            return np.arange(length, dtype=np.int64)
        return shuffle_order(length, self.block, _rng(*self.seed_parts, block))

    def iter_blocks(self, start_row: int = 0) -> Iterator[list[Row]]:
        """The slot's rows from ``start_row`` on, one list per shuffle block (then padding chunks).

        Each list holds at most one block's rows, so a reader knows which records of the block are
        still wanted before it reads them. Memory: one block, whatever the slot holds.
        """
        chunk = self.block if self.block > 1 else _CHUNK
        total = int(self.piece_rows.sum())
        row = start_row
        walker: Iterator[tuple[int, int]] | None = None
        while row < self.valid_rows:
            block = row // chunk
            first = block * chunk
            length = min(chunk, total - first)
            if walker is None:
                walker = self._walk(first)
            keys = [next(walker) for _ in range(length)]
            order = self._order(block, length)[row - first : self.valid_rows - first].tolist()
            yield [(*keys[q], True) for q in order]
            row = first + length
        row = max(start_row, self.valid_rows)
        while row < self.rows:
            n = min(chunk, self.rows - row)
            yield [(-1, -1, False)] * n
            row += n

    def iter_rows(self, start_row: int = 0) -> Iterator[Row]:
        """Rows ``(piece or -1, index, valid)`` from ``start_row`` on."""
        for rows in self.iter_blocks(start_row):
            yield from rows

    def entries(self) -> list[tuple[str | None, int, bool]]:
        """Every row as ``(shard url or None for padding, index in shard, valid)`` (O(rows): for tests
        and small dry runs)."""
        return [(self.shards[p] if p >= 0 else None, i, v) for p, i, v in self.iter_rows()]

    def consume(
        self, rows: int, shard_ids: np.ndarray, prefix: np.ndarray, extra: dict[int, set[int]]
    ) -> None:
        """Add the samples of this slot's first ``rows`` rows to ``prefix``/``extra`` (by shard id;
        ``shard_ids[j]`` is piece ``j``'s position in the shard list)."""
        rows = min(rows, self.valid_rows)  # valid rows come first: padding consumes nothing
        chunk = self.block if self.block > 1 else _CHUNK
        whole = rows // chunk * chunk  # stream positions [0, whole) are consumed
        ends = np.cumsum(self.piece_rows)
        done = int(np.searchsorted(ends, whole, side="right"))
        for j in range(done):
            k = int(shard_ids[j])
            prefix[k] = int(self.sizes[j])
        partial = self._block_keys(whole, rows - whole)
        if done < len(self.shards) and whole > (int(ends[done - 1]) if done else 0):
            piece, index = next(self._walk(whole))  # the first record not wholly consumed
            prefix[int(shard_ids[piece])] = index
        for piece, index in partial:
            extra.setdefault(int(shard_ids[piece]), set()).add(index)

    def _block_keys(self, first: int, rows: int) -> list[tuple[int, int]]:
        """Records of the first ``rows`` rows of the block starting at stream position ``first``."""
        if rows <= 0:
            return []
        chunk = self.block if self.block > 1 else _CHUNK
        length = min(chunk, int(self.piece_rows.sum()) - first)
        walker = self._walk(first)
        keys = [next(walker) for _ in range(length)]
        return [keys[q] for q in self._order(first // chunk, length)[:rows].tolist()]


@dataclass
class EpochPlan:
    """The epoch of every (rank, worker) slot. Counts are eager; row orders are built per slot on demand.

    ``batches_per_rank`` and ``samples_per_rank`` (rows, padding included) are the same on every rank;
    ``valid_per_rank`` counts real rows. ``padding``/``dropped`` are totals over all slots (``dropped``:
    samples trimmed by ``drop_last=True``). ``warnings`` are human-readable layout problems.
    ``consumed``: samples of the epoch yielded before this plan, which it leaves out (exact mode,
    ``Consumed``), or rows drawn before it, which shorten it (resampled mode, ``Drawn``).
    """

    mode: str
    seed: int
    epoch: int
    topology: Topology
    batch_size: int
    shuffle_buffer: int
    batches_per_slot: int
    slot_shards: list[np.ndarray]  # per slot: positions into ``shard_list`` in reading order
    slot_rows: list[int]  # per slot: real rows (before padding)
    shard_list: tuple[ShardInfo, ...]
    consumed: Consumed | Drawn | None = None
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
        """The rows of slot (rank, worker); ``worker`` counts from 0 even when num_workers=0."""
        if not (0 <= rank < self.topology.world_size and 0 <= worker < self.topology.workers):
            raise ValueError(f"no slot (rank={rank}, worker={worker}) in {self.topology}")
        s = rank * self.topology.workers + worker
        if s not in self._cache:
            self._cache[s] = self._build_slot(rank, worker, s)
        return self._cache[s]

    def _build_slot(self, rank: int, worker: int, s: int) -> SlotPlan:
        positions = self.slot_shards[s]
        sizes = np.fromiter((self.shard_list[p].num_samples for p in positions), np.int64, len(positions))
        starts, skips = np.zeros(len(positions), dtype=np.int64), {}
        if isinstance(self.consumed, Consumed):
            starts = self.consumed.prefix[positions]
            for k, indices in self.consumed.extra.items():
                for j in np.flatnonzero(positions == k).tolist():
                    skips[j] = indices
        seed_parts = (
            (self.seed, self.epoch, 2, s)
            if self.mode == "exact"
            else (self.seed, 4, rank, worker, self.epoch, *_resume_salt(self.consumed))
        )
        return SlotPlan(
            rank=rank,
            worker=worker,
            shards=tuple(self.shard_list[p].url for p in positions),
            sizes=sizes,
            starts=starts,
            skips=skips,
            valid_rows=self.slot_rows[s],
            batches=self.batches_per_slot,
            batch_size=self.batch_size,
            block=max(self.shuffle_buffer, 1),
            seed_parts=seed_parts,
        )

    def consumed_after(self, batches: int) -> Consumed | Drawn:
        """The epoch's samples yielded once every rank has consumed its first ``batches`` batches of
        this plan (ranks move in lockstep; a rank's batch ``i`` comes from its worker ``i % W``), plus
        those consumed before the plan (``consumed``). Resampled mode: the rows drawn so far."""
        if self.mode == "resampled":
            before = self.consumed.rows if isinstance(self.consumed, Drawn) else 0
            return Drawn(before + batches * self.batch_size * self.topology.world_size)
        assert not isinstance(self.consumed, Drawn)
        sizes = np.asarray([sh.num_samples for sh in self.shard_list], dtype=np.int64)
        base = self.consumed
        prefix = np.zeros(len(sizes), dtype=np.int64) if base is None else base.prefix.copy()
        extra: dict[int, set[int]] = {} if base is None else {k: set(v) for k, v in base.extra.items()}
        workers = self.topology.workers
        for rank in range(self.topology.world_size):
            for worker in range(workers):
                slot_batches = max(0, -(-(batches - worker) // workers))
                slot = self.slot(rank, worker)
                slot.consume(
                    slot_batches * self.batch_size, self.slot_shards[rank * workers + worker], prefix, extra
                )
        return _normalised(prefix, extra, sizes)


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
    consumed: Consumed | Drawn | None = None,
) -> EpochPlan:
    """The epoch plan (see the module docstring). Pure: the same inputs give the same plan anywhere.

    ``samples_per_epoch`` (global, resampled mode only) is spread evenly over the slots and rounded up
    to whole batches per slot. ``weights`` (resampled only): one non-negative weight per shard, the
    relative probability of drawing it. ``drop_last`` (exact only): trim instead of pad.
    ``consumed``: plan the rest of the epoch, leaving these samples out (exact, ``Consumed``) or
    drawing only the rows not yet drawn, seeded apart from the first draws (resampled, ``Drawn``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shards = tuple(shards)
    if not shards:
        raise ValueError("no shards to stream")
    slots, workers = topology.slots, topology.workers
    sizes = np.fromiter((sh.num_samples for sh in shards), dtype=np.int64, count=len(shards))
    common: dict[str, Any] = dict(
        mode=mode,
        seed=seed,
        epoch=epoch,
        topology=topology,
        batch_size=batch_size,
        shard_list=shards,
        shuffle_buffer=shuffle_buffer,
    )
    if isinstance(consumed, Drawn) != (mode == "resampled") and consumed is not None:
        raise ValueError(f"{type(consumed).__name__} does not apply to {mode} mode")
    if mode == "resampled":
        if samples_per_epoch is None or samples_per_epoch < 1:
            raise ValueError("resampled mode needs samples_per_epoch >= 1 (global samples per epoch)")
        if drop_last:
            raise ValueError("drop_last applies to exact mode only (resampled epochs are whole batches)")
        p = _shard_probabilities(sizes, weights)
        wanted = samples_per_epoch - (consumed.rows if isinstance(consumed, Drawn) else 0)
        per_slot = max(0, math.ceil(wanted / (slots * batch_size)))
        rows = per_slot * batch_size
        size_list = sizes.tolist()
        slot_shards = []
        for rank in range(topology.world_size):
            for worker in range(workers):
                rng = _rng(seed, 3, rank, worker, epoch, *_resume_salt(consumed))
                drawn: list[int] = []
                total = 0
                while total < rows:  # draw in chunks; keep only what is needed
                    chunk = max(8, rows // max(int(sizes.min()), 1))
                    for pos in rng.choice(len(shards), size=chunk, p=p).tolist():
                        if total >= rows:
                            break
                        drawn.append(pos)
                        total += size_list[pos]
                slot_shards.append(np.asarray(drawn, dtype=np.int64))
        return EpochPlan(
            batches_per_slot=per_slot,
            slot_shards=slot_shards,
            slot_rows=[rows] * slots,
            consumed=consumed,
            **common,
        )

    if weights is not None or samples_per_epoch is not None:
        raise ValueError("weights and samples_per_epoch apply to resampled mode only")
    if sizes.sum() == 0:
        raise ValueError("the shards hold no samples (sizes.json says 0 for every shard)")
    loads = sizes if consumed is None else consumed.remaining(sizes)
    perm = _rng(seed, epoch, 0).permutation(len(shards))
    if consumed is not None:
        perm = perm[loads[perm] > 0]  # the rest of an epoch: only shards with samples left
    labels = _rng(seed, epoch, 1).permutation(slots)  # greedy bin -> slot, new each epoch
    slot_shards = _assign(perm, loads[perm], slots, labels)
    slot_load = [int(loads[members].sum()) for members in slot_shards]
    if drop_last:
        per_slot = min(slot_load) // batch_size
        slot_rows = [per_slot * batch_size] * slots
    else:
        per_slot = max(math.ceil(n / batch_size) for n in slot_load)
        slot_rows = slot_load
    plan = EpochPlan(
        batches_per_slot=per_slot, slot_shards=slot_shards, slot_rows=slot_rows, consumed=consumed, **common
    )
    plan.padding = per_slot * batch_size * slots - sum(slot_rows)
    plan.dropped = sum(slot_load) - sum(slot_rows)
    layout = f"{topology.world_size} rank(s) x {workers} worker(s) = {slots} slots"
    n = len(perm)
    if n < slots:
        what = "shards" if consumed is None else "shards with samples left"
        empty = (
            "yield only padding rows" if not drop_last else "leave every slot empty: the epoch has 0 batches"
        )
        plan.warnings.append(
            f"{n} {what} for {layout}: {slots - n} slots read no shard and {empty}; "
            "write more, smaller shards or use fewer workers"
        )
    elif n < 4 * slots:
        plan.warnings.append(
            f"{n / slots:.1f} shards per worker for {layout} (fewer than 4): slot sizes are uneven "
            "(more padding or dropped samples) and batches mix few shards; write more, smaller shards"
        )
    if drop_last and per_slot == 0:
        plan.warnings.append(
            f"drop_last: the smallest slot has fewer than batch_size={batch_size} samples, so the epoch is empty"
        )
    return plan


def _resume_salt(consumed: Consumed | Drawn | None) -> tuple[int, ...]:
    """Seed parts that set a resampled epoch's rest apart from its first draws (none for a whole epoch,
    so a fresh epoch's draws do not change)."""
    return (1, consumed.rows) if isinstance(consumed, Drawn) else ()


def _assign(perm: np.ndarray, loads: np.ndarray, slots: int, labels: np.ndarray) -> list[np.ndarray]:
    """Shards (``perm``, with ``loads`` samples each) onto slots: largest first onto the least-loaded
    bin (ties: earlier in the permutation), bin ``b`` becoming slot ``labels[b]``; each slot reads its
    shards in permutation order. O(shards log slots), in arrays of 8 bytes per shard."""
    n = len(perm)
    order = np.lexsort((np.arange(n), -loads))  # by size, descending; ties in permutation order
    bin_of = np.empty(n, dtype=np.int64)
    heap = [(0, b) for b in range(slots)]
    for start in range(0, n, _CHUNK):  # chunks: no list of every shard at once
        part = order[start : start + _CHUNK]
        for rank_in_perm, size in zip(part.tolist(), loads[part].tolist(), strict=True):
            load, b = heap[0]
            bin_of[rank_in_perm] = b
            heapq.heapreplace(heap, (load + size, b))
    by_bin = np.argsort(bin_of, kind="stable")  # stable: permutation order within a bin
    bounds = np.cumsum(np.bincount(bin_of, minlength=slots))[:-1]
    slot_shards: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * slots
    for b, members in enumerate(np.split(by_bin, bounds)):
        slot_shards[int(labels[b])] = perm[members]
    return slot_shards


def _shard_probabilities(sizes: np.ndarray, weights: Sequence[float] | None) -> np.ndarray:
    w = np.ones(len(sizes)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(sizes),) or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be {len(sizes)} finite non-negative numbers (one per shard)")
    w = np.where(sizes > 0, w, 0.0)  # an empty shard can never fill a batch
    if w.sum() <= 0:
        raise ValueError("no shard with samples has a positive weight")
    return w / w.sum()
