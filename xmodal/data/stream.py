"""Streaming epochs over tar shards: a pure epoch plan, and the ``IterableDataset`` that realises it.

The streaming contract (docs/ARCHITECTURE.md "Data"), in two layers:

1. ``plan_epoch(...)`` → ``EpochPlan``: a pure function of (shard sizes, mode, seed, epoch, topology,
   batch size). It says, for every (rank, worker) *slot*, which shards the slot reads, in which order
   it yields their samples, and which rows are padding. No tar is opened, so it is cheap to test.
2. ``ShardStream`` (an ``IterableDataset`` yielding whole *batches*): each DataLoader worker realises
   its slot of the plan, reading raw tar records (``iter_shard``), shuffling the raw records,
   decoding each with the caller's ``decode``, and collating batches of exactly ``batch_size`` rows.

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

Epoch. ``set_epoch(epoch)`` in the main process before iterating. The value lives in shared memory
created in the main process (like open_clip's ``SharedEpoch``), so workers read the current epoch when
they start an iteration, also with ``persistent_workers=True`` where the worker's copy of the dataset
is never refreshed. Never rely on a counter inside a worker.

Resume. ``state_dict()`` = ``{seed, epoch, batches_consumed, topology, mode, ...}``; the caller reports
consumed batches with ``mark_consumed(n)`` (``StreamLoader`` does it for you). The DataLoader hands
out batches round-robin, so batch ``i`` of a rank came from worker ``i % W``; after
``load_state_dict`` worker ``w`` plays slot ``(w + consumed) % W`` and skips that slot's consumed
batches, so the resumed rank yields exactly the remaining batches of the epoch, in the original order.
A changed topology is refused (ValueError naming old and new).

Lightning integration (checked against lightning 2.6 ``fit_loop.py`` / ``combined_loader.py``):
Lightning calls ``state_dict()`` on each *DataLoader* object returned by ``train_dataloader()`` that
implements ``state_dict``/``load_state_dict`` (``_Stateful``), saves the list under
``checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]`` and calls ``load_state_dict`` in
``FitLoop.setup_data`` *before* the first ``iter()`` of a resumed fit. A plain DataLoader has no
such methods; use ``StreamLoader``, which delegates them to the stream and counts the batches it hands
out. Because the loader has a ``__len__``, Lightning does not prefetch ahead, so "batches handed out"
equals "batches trained" when a checkpoint is written. Lightning calls ``set_epoch`` only on the
DataLoader's sampler; ``StreamLoader`` exposes a sampler proxy that forwards ``set_epoch`` to the stream,
so the epoch follows ``trainer.current_epoch`` without a callback.

Bad data. A decode exception (from ``decode``) or an unreadable/truncated shard (``ShardError``) is
caught, counted per shard (``skip_counts()``), logged rate-limited (never a sleep), and the affected
rows become padding rows (``valid=False``): batch counts stay equal in every mode, so DDP never hangs
on bad data. ``max_consecutive_failures`` failures without a good sample in between raise
RuntimeError naming the shard. Padding rows are copies of the slot's first decodable sample.
"""

from __future__ import annotations

import heapq
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from xmodal.data.shards import ShardError, iter_shard, split_shard_sizes

log = logging.getLogger(__name__)

MODES = ("exact", "resampled")
STATE_VERSION = 1
Decode = Callable[[dict[str, Any]], dict[str, Any]]
Collate = Callable[[list[dict[str, Any]]], Any]


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


def collate_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Default collate: tensors are stacked, numbers and bools become tensors, anything else a list."""
    out: dict[str, Any] = {}
    for name in rows[0]:
        values = [row.get(name) for row in rows]
        if name == "__key__":
            out[name] = values
        elif all(isinstance(v, torch.Tensor) for v in values):
            out[name] = torch.stack(values)
        elif all(isinstance(v, bool) for v in values):
            out[name] = torch.tensor(values, dtype=torch.bool)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[name] = torch.tensor(values)
        else:
            out[name] = values
    return out


class _Failure(Exception):
    """A record that could not be read (the shard error is already counted)."""


class _SlotReader:
    """Raw records of one slot by (shard position, index), read sequentially with a look-ahead cache.

    Only records in ``needed`` are kept; since the plan's order comes from a shuffle buffer, the cache
    never holds more than the buffer's worth of raw records. Shards with nothing needed are not opened,
    and a shard is read no further than its last needed record.
    """

    def __init__(
        self,
        plan: SlotPlan,
        needed: set[tuple[int, int]],
        on_shard_error: Callable[[int, Exception], None],
        allow_pipe: bool = False,
    ):
        self.plan, self.needed, self.on_shard_error = plan, needed, on_shard_error
        self.allow_pipe = allow_pipe
        self.last_needed: dict[int, int] = {}
        for s, i in needed:
            self.last_needed[s] = max(self.last_needed.get(s, -1), i)
        self.cache: dict[tuple[int, int], dict[str, Any]] = {}
        self.cur, self.nxt = -1, 0  # shard being read, next index in it
        self.records: Iterator[dict[str, Any]] | None = None

    def get(self, s: int, i: int) -> dict[str, Any]:
        """The record, or ``_Failure`` if its shard ended or broke before it."""
        if (s, i) in self.cache:
            return self.cache.pop((s, i))
        while True:
            if self.cur > s or (self.cur == s and (self.records is None or self.nxt > i)):
                raise _Failure
            if self.cur < s and (self.records is None or self.nxt > self.last_needed.get(self.cur, -1)):
                self.cur = min(p for p in self.last_needed if p > self.cur)  # s itself is needed
                self.nxt, self.records = 0, iter_shard(self.plan.shards[self.cur], self.allow_pipe)
            assert self.records is not None
            try:
                record = next(self.records)
            except StopIteration:
                self.records = None
                size = self.plan.sizes[self.cur]
                if self.nxt < size:
                    url = self.plan.shards[self.cur]
                    self.on_shard_error(
                        self.cur, ShardError(f"{url}: {self.nxt} samples, but sizes.json says {size}")
                    )
                continue
            except (ShardError, OSError) as error:
                self.records = None
                self.on_shard_error(self.cur, error)
                continue
            key = (self.cur, self.nxt)
            self.nxt += 1
            if key == (s, i):
                return record
            if key in self.needed:
                self.cache[key] = record


class ShardStream(IterableDataset):
    """Batches of one rank's share of an epoch (see the module docstring for the contract).

    Args:
        shards: the split's shards with their sample counts (``shards_from_dir``).
        mode: ``"exact"`` or ``"resampled"``.
        seed: shared by all ranks.
        topology: this rank's ``Topology`` (its ``num_workers`` must be the DataLoader's).
        batch_size: rows per yielded batch (use the DataLoader with ``batch_size=None``; ``StreamLoader``).
        decode: raw record (``{"__key__", "__shard__", ext: bytes}``) → sample dict; an exception skips
            the sample (counted). Default: the raw record itself.
        collate: list of sample dicts (each with ``valid`` and ``__key__``) → batch; default
            ``collate_rows``.
        samples_per_epoch, weights, drop_last, shuffle_buffer: see ``plan_epoch``.
        max_consecutive_failures: failures without a good sample in between before RuntimeError.
        log_interval_s: at most one error log line per shard per this many seconds (after the first 3).
        allow_pipe: run ``pipe:`` shard urls (shell commands); refused otherwise (``data.allow_pipe``).
    """

    def __init__(
        self,
        shards: Sequence[ShardInfo],
        mode: str,
        seed: int,
        topology: Topology,
        batch_size: int,
        decode: Decode | None = None,
        collate: Collate | None = None,
        *,
        samples_per_epoch: int | None = None,
        weights: Sequence[float] | None = None,
        drop_last: bool = False,
        shuffle_buffer: int = 1000,
        max_consecutive_failures: int = 100,
        log_interval_s: float = 10.0,
        allow_pipe: bool = False,
    ):
        super().__init__()
        self.allow_pipe = allow_pipe
        self.shards = tuple(shards)
        self.mode, self.seed, self.topology, self.batch_size = mode, seed, topology, batch_size
        self.decode, self.collate = decode, collate or collate_rows
        self.samples_per_epoch, self.weights, self.drop_last = samples_per_epoch, weights, drop_last
        self.shuffle_buffer = shuffle_buffer
        self.max_consecutive_failures = max_consecutive_failures
        self.log_interval_s = log_interval_s
        self._shard_ids = {sh.url: k for k, sh in enumerate(self.shards)}
        # Shared memory made here, in the main process: workers (fork, spawn, persistent) see updates.
        self._shared = multiprocessing.RawArray("q", [0, 0])  # [epoch, first batch of next iteration]
        n = len(self.shards) * topology.workers
        self._skips = multiprocessing.RawArray("q", n)  # [worker, shard] skipped rows
        self._errors = multiprocessing.RawArray("q", n)  # [worker, shard] failure events
        self._consumed = 0
        self._pending_start: int | None = None
        self._plan: EpochPlan | None = None
        self._last_log: dict[int, float] = {}
        self.plan(0)  # validate arguments now, in the main process

    # ---- main-process API -------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return int(self._shared[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next iteration (call in the main process before ``iter``).

        Changing the epoch starts it from its first batch (drops a resume position).
        """
        if int(epoch) != self.epoch:
            self._shared[0] = int(epoch)
            self._shared[1] = 0
            self._consumed = 0
            self._pending_start = None

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The ``EpochPlan`` of ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if self._plan is None or self._plan.epoch != epoch:
            self._plan = plan_epoch(
                self.shards,
                self.mode,
                self.seed,
                epoch,
                self.topology,
                self.batch_size,
                samples_per_epoch=self.samples_per_epoch,
                weights=self.weights,
                drop_last=self.drop_last,
                shuffle_buffer=self.shuffle_buffer,
            )
        return self._plan

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same every epoch and on every rank)."""
        return self.plan().batches_per_rank

    def mark_consumed(self, n: int = 1) -> None:
        """Report ``n`` more batches of the current epoch consumed by the training loop."""
        self._consumed += n

    def begin_iteration(self) -> None:
        """Main process, just before ``iter(dataloader)``: start from the resume position if one was
        loaded (once), else from the epoch's first batch. ``StreamLoader`` calls it."""
        start = self._pending_start or 0
        self._pending_start = None
        self._consumed = start
        self._shared[1] = start

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "mode": self.mode,
            "seed": self.seed,
            "epoch": self.epoch,
            "batches_consumed": self._consumed,
            "batch_size": self.batch_size,
            "topology": asdict(self.topology),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration yields the batches of ``state["epoch"]`` not yet consumed.

        Raises ValueError when the world size, worker count, mode, seed or batch size differ (the order
        would not continue the saved one); a state saved by another rank of the same layout is fine.
        A finished epoch resumes at the start of the next one.
        """
        old = Topology(**state["topology"])
        # Lightning checkpoints rank 0's loader state only. Every rank runs the same number of
        # batches, so rank 0's position is every rank's: only world size and workers must match.
        if (old.world_size, old.num_workers) != (self.topology.world_size, self.topology.num_workers):
            raise ValueError(
                "cannot resume the data stream with a different topology: saved (rank, world_size, "
                f"num_workers) = ({old.rank}, {old.world_size}, {old.num_workers}), now "
                f"({self.topology.rank}, {self.topology.world_size}, {self.topology.num_workers}); "
                "resume with the same devices, nodes and data.num_workers, or start the epoch over"
            )
        for name in ("mode", "seed", "batch_size"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"cannot resume the data stream: saved {name}={state[name]!r}, now {getattr(self, name)!r}"
                )
        epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        if consumed >= self.plan(epoch).batches_per_rank:
            epoch, consumed = epoch + 1, 0
        self._shared[0] = epoch
        self._shared[1] = consumed
        self._consumed = consumed
        self._pending_start = consumed

    def skip_counts(self) -> dict[str, int]:
        """Rows skipped (unreadable or undecodable) per shard URL, summed over workers (shared memory,
        so this works in the main process for DataLoader workers too). Only shards with skips."""
        return self._sum(self._skips)

    def error_counts(self) -> dict[str, int]:
        """Failure events (decode errors, shard read errors) per shard URL."""
        return self._sum(self._errors)

    def _sum(self, array: Any) -> dict[str, int]:
        n = len(self.shards)
        totals = [sum(array[w * n + k] for w in range(self.topology.workers)) for k in range(n)]
        return {self.shards[k].url: t for k, t in enumerate(totals) if t}

    # ---- worker side ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        expected = self.topology.num_workers
        if info is None:
            if expected != 0:
                raise RuntimeError(
                    f"ShardStream topology says num_workers={expected} but it is iterated in the main "
                    f"process: use a DataLoader with num_workers={expected} (StreamLoader), or "
                    "iter_worker(w) to run one worker's share in this process"
                )
            return self.iter_worker(0)
        if info.num_workers != expected:
            raise RuntimeError(
                f"ShardStream topology has num_workers={expected} but the DataLoader runs "
                f"{info.num_workers} workers: build the Topology with the DataLoader's num_workers"
            )
        return self.iter_worker(info.id)

    def iter_worker(self, worker: int) -> Iterator[Any]:
        """The batches DataLoader worker ``worker`` yields, run in this process (a generator: the
        epoch and resume position are read when iteration starts). Also the dry-run hook of
        ``plan_report``."""
        workers = self.topology.workers
        if not 0 <= worker < workers:
            raise ValueError(f"worker {worker} out of range for {self.topology}")
        epoch, start = int(self._shared[0]), int(self._shared[1])
        slot = (worker + start) % workers  # keeps the round-robin order of an uninterrupted epoch
        skip = max(0, -(-(start - slot) // workers))
        plan = self.plan(epoch).slot(self.topology.rank, slot)
        yield from self._slot_batches(plan, worker, skip, epoch)

    def _slot_batches(self, plan: SlotPlan, worker: int, skip_batches: int, epoch: int = 0) -> Iterator[Any]:
        first = skip_batches * self.batch_size
        shard, index, valid = (
            plan.shard[first:].tolist(),
            plan.index[first:].tolist(),
            plan.valid[first:].tolist(),
        )
        needed = {(s, i) for s, i in zip(shard, index, strict=True) if s >= 0}
        state = {"consecutive": 0, "template": None}

        def fail(pos: int, error: Exception) -> None:
            url = plan.shards[pos]
            k = self._shard_ids.get(url, 0)
            self._errors[worker * len(self.shards) + k] += 1
            state["consecutive"] += 1
            self._log_error(k, url, error)
            if state["consecutive"] >= self.max_consecutive_failures:
                raise RuntimeError(
                    f"{state['consecutive']} consecutive data failures (max_consecutive_failures="
                    f"{self.max_consecutive_failures}); the last in shard {url}: {error}"
                ) from error

        reader = _SlotReader(plan, needed, fail, self.allow_pipe)
        rows: list[dict[str, Any]] = []
        for s, i, ok in zip(shard, index, valid, strict=True):
            row = None
            if ok:
                try:
                    raw = reader.get(s, i)
                except _Failure:
                    raw = None
                if raw is not None:
                    # Decoders see the epoch, so per-epoch choices (which caption) are deterministic.
                    raw = {**raw, "__epoch__": epoch}
                    try:
                        row = dict(self.decode(raw)) if self.decode is not None else dict(raw)
                    except Exception as error:  # noqa: BLE001 - any decoder error skips the sample
                        fail(s, error)
                if row is None:
                    k = self._shard_ids.get(plan.shards[s], 0)
                    self._skips[worker * len(self.shards) + k] += 1
                else:
                    state["consecutive"] = 0
                    row.setdefault("__key__", raw["__key__"])
                    row["valid"] = True
            if row is None:
                if state["template"] is None:
                    state["template"] = self._template(plan)
                row = dict(state["template"])
            rows.append(row)
            if len(rows) == self.batch_size:
                yield self.collate(rows)
                rows = []

    def _template(self, plan: SlotPlan) -> dict[str, Any]:
        """A padding row: the first decodable sample of the slot's shards, else of any shard.

        Gives up (RuntimeError naming the shard) after ``max_consecutive_failures`` failed records, so
        a broken data set never makes a worker read every shard. Failures here are not counted as skips.
        """
        failures, last = 0, ("", Exception("no shard"))
        for url in dict.fromkeys([*plan.shards, *(sh.url for sh in self.shards)]):
            try:
                for raw in iter_shard(url, self.allow_pipe):
                    try:
                        row = dict(self.decode(raw)) if self.decode is not None else dict(raw)
                    except Exception as error:  # noqa: BLE001 - any decoder error
                        failures, last = failures + 1, (url, error)
                        if failures >= self.max_consecutive_failures:
                            break
                        continue
                    row.setdefault("__key__", raw["__key__"])
                    row["valid"] = False
                    return row
            except (ShardError, OSError) as error:
                failures, last = failures + 1, (url, error)
            if failures >= self.max_consecutive_failures:
                break
        raise RuntimeError(
            f"{failures} consecutive data failures while looking for a decodable sample for padding rows "
            f"(max_consecutive_failures={self.max_consecutive_failures}); the last in shard {last[0]}: {last[1]}"
        )

    def _log_error(self, k: int, url: str, error: Exception) -> None:
        now = time.monotonic()
        n = sum(self._errors[w * len(self.shards) + k] for w in range(self.topology.workers))
        if n <= 3 or now - self._last_log.get(k, -math.inf) >= self.log_interval_s:
            self._last_log[k] = now
            log.warning("data error %d in shard %s (sample skipped): %s", n, url, error)


class _EpochSampler:
    """Stands in for the DataLoader's sampler so Lightning's ``set_epoch`` call reaches the stream."""

    def __init__(self, inner: Any, stream: ShardStream):
        self.inner, self.stream = inner, stream

    def __iter__(self) -> Iterator[Any]:
        return iter(self.inner)

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)


_PACKED = "__packed_tensors__"


def pack_tensors(batch: Any) -> Any:
    """Worker side of the hand-over: every tensor of the batch copied into one uint8 buffer.

    Each tensor a worker hands over becomes its own shared-memory segment, and the main process
    fetches each segment's file descriptor through a socket handshake (~0.7 ms apiece on CPU):
    for ids, masks, labels and ``valid`` flags that costs far more than their bytes. Packed, a
    batch crosses as one segment; the extra copy of the images (~0.1 ms for 64×3×64×64 uint8) is
    cheaper than one handshake. The main process unpacks views of that buffer
    (``unpack_tensors``), keys in their order.
    """
    if not isinstance(batch, dict):
        return batch
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if len(tensors) < 2:
        return batch
    layout, offset = [], 0
    for key, tensor in tensors.items():
        layout.append((key, tensor.dtype, tuple(tensor.shape), offset))
        offset += -(-tensor.numel() * tensor.element_size() // 8) * 8  # 8-byte aligned: any dtype views
    buffer = torch.empty(offset, dtype=torch.uint8)
    for (_, _, _, start), tensor in zip(layout, tensors.values(), strict=True):
        flat = tensor.contiguous().view(-1).view(torch.uint8)
        buffer[start : start + len(flat)] = flat
    return {
        **{k: v for k, v in batch.items() if k not in tensors},
        _PACKED: (buffer, layout, list(batch)),
    }


def unpack_tensors(batch: Any) -> Any:
    """Main-process side of ``pack_tensors`` (a batch that was not packed passes through)."""
    if not isinstance(batch, dict) or _PACKED not in batch:
        return batch
    buffer, layout, order = batch.pop(_PACKED)
    for key, dtype, shape, start in layout:
        size = math.prod(shape) * dtype.itemsize
        batch[key] = buffer[start : start + size].view(dtype).view(shape)
    return {key: batch[key] for key in order}


class StreamLoader(DataLoader):
    """A DataLoader over a ``ShardStream`` that Lightning can checkpoint and resume.

    ``batch_size=None`` (the stream batches), ``num_workers`` = the topology's. It counts the batches
    it hands out (``mark_consumed``), implements ``state_dict``/``load_state_dict`` (Lightning's
    ``_Stateful``), and forwards ``set_epoch`` from Lightning's sampler hook to the stream.
    """

    def __init__(self, stream: ShardStream, **kwargs: Any):
        workers = kwargs.pop("num_workers", stream.topology.num_workers)
        if workers != stream.topology.num_workers:
            raise ValueError(
                f"num_workers={workers} but the stream's topology has num_workers={stream.topology.num_workers}"
            )
        if kwargs.pop("batch_size", None) is not None:
            raise ValueError("StreamLoader batches inside the stream: leave batch_size unset")
        if workers > 0:
            kwargs.setdefault("collate_fn", pack_tensors)  # undone in _Counting, main process
        super().__init__(stream, batch_size=None, num_workers=workers, **kwargs)

    @property  # type: ignore[override]
    def sampler(self) -> Any:
        return self._epoch_sampler

    @sampler.setter
    def sampler(self, value: Any) -> None:
        self._epoch_sampler = _EpochSampler(value, self.dataset)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        stream: ShardStream = self.dataset  # type: ignore[assignment]
        stream.begin_iteration()
        iterator = super().__iter__()
        return _Counting(iterator, stream)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)  # type: ignore[attr-defined]

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)  # type: ignore[attr-defined]


class _Counting:
    def __init__(self, iterator: Iterator[Any], stream: ShardStream):
        self.iterator, self.stream = iterator, stream

    def __iter__(self) -> _Counting:
        return self

    def __next__(self) -> Any:
        batch = unpack_tensors(next(self.iterator))
        self.stream.mark_consumed(1)
        return batch

    def __len__(self) -> int:
        return len(self.stream)
