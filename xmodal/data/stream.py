"""The ``IterableDataset`` that realises an epoch plan (``xmodal.data.epoch_plan``) on tar shards.

``ShardStream`` yields whole *batches*: each DataLoader worker realises its slot of the plan, reading
raw tar records (``iter_shard``), shuffling the raw records, decoding each with the caller's
``decode``, and collating batches of exactly ``batch_size`` rows.

Epoch. ``set_epoch(epoch)`` in the main process before iterating. The value lives in shared memory
created in the main process (like open_clip's ``SharedEpoch``), so workers read the current epoch when
they start an iteration, also with ``persistent_workers=True`` where the worker's copy of the dataset
is never refreshed. Never rely on a counter inside a worker.

Resume. ``state_dict()`` = ``{seed, epoch, batches_consumed, topology, mode, consumed, ...}``; the
caller reports consumed batches with ``mark_consumed(n)`` (``StreamLoader`` does it for you). Every rank
runs the same number of batches, so rank 0's count is every rank's (Lightning saves rank 0's state only),
and from it ``consumed`` names the epoch's samples already yielded on *all* ranks, by shard
(``epoch_plan.Consumed``: a consumed prefix per shard and a few extra indices), not by slot.

- Same world size and workers: the DataLoader hands out batches round-robin, so batch ``i`` of a rank
  came from worker ``i % W``; after ``load_state_dict`` worker ``w`` plays slot ``(w + consumed) % W``
  and skips that slot's consumed batches, so the resumed rank yields exactly the remaining batches of
  the epoch, in the original order.
- Another world size or worker count (exact mode): the *rest* of the epoch is planned over the new
  topology (``plan_epoch(..., consumed=...)``), so every sample not yet yielded is yielded exactly once,
  on equal batch counts per rank; ``len()`` is then the batches already run plus the rest. The next
  epoch is whole again. Resampled mode has no sample set to complete, only a length: the rows of the
  epoch not yet drawn are drawn afresh over the new topology (seeded by where the epoch stood).

Bad data. A decode exception (from ``decode``) or an unreadable/truncated shard (``ShardError``) is
caught, counted per shard (``skip_counts()``), logged rate-limited (never a sleep), and the affected
rows become padding rows (``valid=False``): batch counts stay equal in every mode, so DDP never hangs
on bad data. ``max_consecutive_failures`` failures without a good sample in between raise
RuntimeError naming the shard. Padding rows are copies of the slot's first decodable sample.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from xmodal.data.carve import KeepRange, kept
from xmodal.data.epoch_plan import (
    Consumed,
    Drawn,
    EpochPlan,
    Row,
    ShardInfo,
    SlotPlan,
    Topology,
    consumed_from_state,
    plan_epoch,
)
from xmodal.data.shards import DataFailure, ShardError, iter_shard

log = logging.getLogger(__name__)

STATE_VERSION = 3  # 2: consumed samples by shard (elastic resume), block-shuffle order; 3: resampled too
Decode = Callable[[dict[str, Any]], dict[str, Any]]
Collate = Callable[[list[dict[str, Any]]], Any]


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


_warned_more: set[str] = set()


def _warn_more(url: str, size: int) -> None:
    """Once per shard and process: records past the indexed count are never read silently."""
    if url not in _warned_more:
        _warned_more.add(url)
        log.warning(
            "%s holds more samples than its index says (%d): the rest are not read; rebuild the index "
            "(`xmodal-shards index`, or fix sizes.json)",
            url,
            size,
        )


class _SlotReader:
    """Raw records of one slot by (piece, index), read sequentially with a look-ahead cache.

    The slot's rows come one shuffle block at a time (``want``): only records of the current block's
    rows are kept when read ahead, so the cache never holds more than one block of raw records.
    Pieces with nothing wanted are not opened, and a piece is read no further than its last wanted
    record of the block (the next block goes on from there: blocks are consecutive runs of the
    slot's stream). Positions count the records a carved split keeps (``keep``: its key-hash range
    per shard url). Counts are checked both ways: a shard ending early is a counted failure; once its
    last indexed record is read, one more is peeked at (cheap: one record, or for a carved split the
    next kept one) and a surplus is logged once.
    """

    def __init__(
        self,
        plan: SlotPlan,
        on_shard_error: Callable[[int, Exception], None],
        allow_pipe: bool = False,
        keep: dict[str, KeepRange | None] | None = None,
    ):
        self.plan, self.on_shard_error = plan, on_shard_error
        self.allow_pipe = allow_pipe
        self.keep = keep or {}
        self.wanted: set[tuple[int, int]] = set()
        self.last_wanted: dict[int, int] = {}
        self.cache: dict[tuple[int, int], dict[str, Any]] = {}
        self.cur, self.nxt = -1, 0  # piece being read, next index in its shard
        self.records: Iterator[dict[str, Any]] | None = None

    def want(self, rows: list[Row]) -> None:
        """The rows of the next block: the records that may be read ahead and kept."""
        self.wanted = {(p, i) for p, i, valid in rows if valid}
        self.last_wanted = {}
        for p, i in self.wanted:
            self.last_wanted[p] = max(self.last_wanted.get(p, -1), i)
        self.cache.clear()  # every wanted record of the last block was asked for in it

    def get(self, s: int, i: int) -> dict[str, Any]:
        """The record, or ``_Failure`` if its shard ended or broke before it."""
        if (s, i) in self.cache:
            return self.cache.pop((s, i))
        while True:
            if self.cur > s or (self.cur == s and (self.records is None or self.nxt > i)):
                raise _Failure
            if self.cur < s and (self.records is None or self.nxt > self.last_wanted.get(self.cur, -1)):
                self.cur = min(p for p in self.last_wanted if p > self.cur)  # s itself is wanted
                url = self.plan.shards[self.cur]
                self.nxt, self.records = 0, kept(iter_shard(url, self.allow_pipe), self.keep.get(url))
            assert self.records is not None
            try:
                record = next(self.records)
            except StopIteration:
                self.records = None
                size = self.plan.sizes[self.cur]
                if self.nxt < size:
                    url = self.plan.shards[self.cur]
                    self.on_shard_error(
                        self.cur, ShardError(f"{url}: {self.nxt} samples, but its index says {size} (fewer)")
                    )
                continue
            except (ShardError, OSError) as error:
                self.records = None
                self.on_shard_error(self.cur, error)
                continue
            key = (self.cur, self.nxt)
            self.nxt += 1
            if self.nxt == self.plan.sizes[self.cur]:
                self._peek_past_end()
            if key == (s, i):
                return record
            if key in self.wanted:
                self.cache[key] = record

    def _peek_past_end(self) -> None:
        """After the last indexed record: is there another? (The shard is done either way.)"""
        assert self.records is not None
        try:
            extra = next(self.records, None)
        except (ShardError, OSError):
            extra = None  # every indexed record was read; `xmodal-shards inspect` names a bad tail
        self.records = None
        if extra is not None:
            _warn_more(self.plan.shards[self.cur], self.plan.sizes[self.cur])


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
        self._keep = {sh.url: sh.keep for sh in self.shards if sh.keep is not None}
        sizes = np.fromiter((sh.num_samples for sh in self.shards), dtype=np.int64, count=len(self.shards))
        self._sizes = sizes
        # Names the index a saved state belongs to: shard count, samples, and a checksum of the sizes
        # (not the urls, so a moved data set still resumes).
        self._index = {"shards": len(sizes), "samples": int(sizes.sum()), "crc": zlib.crc32(sizes.tobytes())}
        # Shared memory made here, in the main process: workers (fork, spawn, persistent) see updates.
        # [epoch, first batch of the next iteration (in the plan), rest-of-epoch plan on?, its generation]
        self._shared = multiprocessing.RawArray("q", [0, 0, 0, 0])
        n = len(self.shards) * topology.workers
        self._skips = multiprocessing.RawArray("q", n)  # [worker, shard] skipped rows
        self._errors = multiprocessing.RawArray("q", n)  # [worker, shard] failure events
        self._consumed = 0  # batches of the epoch run on this rank, earlier plans of it included
        self._pending_start: int | None = None
        self._plan: EpochPlan | None = None
        # An elastic resume plans the rest of an epoch: samples consumed before it, and batches.
        self._base: Consumed | Drawn | None = None
        self._base_epoch = -1
        self._base_batches = 0
        self._base_generation = 0
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
            self._shared[2] = 0
            self._consumed = 0
            self._pending_start = None

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The ``EpochPlan`` of ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        base = self._active_base(epoch)
        if self._plan is None or self._plan.epoch != epoch or self._plan.consumed is not base:
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
                consumed=base,
            )
        return self._plan

    def _active_base(self, epoch: int) -> Consumed | Drawn | None:
        """The samples consumed before an elastic resume, while the rest of that epoch is planned."""
        active = self._base is not None and epoch == self._base_epoch and self._shared[2]
        return self._base if active else None

    def __len__(self) -> int:
        """Batches this rank runs per epoch (the same on every rank). After an elastic resume: the
        epoch's batches run before it plus the rest, as the trainer's batch counter continues."""
        plan = self.plan()
        return (self._base_batches if plan.consumed is not None else 0) + plan.batches_per_rank

    def mark_consumed(self, n: int = 1) -> None:
        """Report ``n`` more batches of the current epoch consumed by the training loop."""
        self._consumed += n

    def begin_iteration(self) -> None:
        """Main process, just before ``iter(dataloader)``: start from the resume position if one was
        loaded (once), else from the epoch's first batch. ``StreamLoader`` calls it."""
        if self._pending_start is None:  # a new pass of the epoch: the whole epoch
            self._shared[2] = 0
        start = self._pending_start or 0
        self._pending_start = None
        self._consumed = start + (self._base_batches if self._shared[2] else 0)
        self._shared[1] = start

    def state_dict(self) -> dict[str, Any]:
        """Where the epoch stands: batches run per rank, and the samples consumed on every rank (exact
        mode: by shard; resampled: a count). O(shards + slots x shuffle_buffer); reads no tar."""
        plan = self.plan()
        start = self._base_batches if plan.consumed is not None else 0
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "mode": self.mode,
            "seed": self.seed,
            "epoch": self.epoch,
            "batches_consumed": self._consumed,
            "batch_size": self.batch_size,
            "topology": asdict(self.topology),
            "index": dict(self._index),
            "plan_start": start,  # batches run before the current plan (an elastic resume) began
            "plan_batches": plan.batches_per_rank,
            "plan_base": plan.consumed.to_state() if plan.consumed is not None else None,
        }
        state["consumed"] = plan.consumed_after(self._consumed - start).to_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration yields the samples of ``state["epoch"]`` not yet consumed.

        The same world size and workers continue the saved order batch for batch (a state saved by
        another rank of the same layout is fine: ranks move in lockstep). Another topology plans the
        rest of the epoch over this one, with this rank's batch size (exact: the samples not yet
        consumed; resampled: the rows not yet drawn). ValueError when the mode, seed or index
        differ, the batch size differs on the same layout, or a state that does not say what was
        consumed (an older xmodal's) meets another topology. A finished epoch resumes at the start
        of the next one.
        """
        old = Topology(**state["topology"])
        same = (old.world_size, old.num_workers) == (self.topology.world_size, self.topology.num_workers)
        # A rank's batch is data.batch_size / world size: it changes with the world size (elastic),
        # and the rest of the epoch is planned with the new one; on the same layout it must not.
        for name in ("mode", "seed", "batch_size") if same else ("mode", "seed"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"cannot resume the data stream: saved {name}={state[name]!r}, now {getattr(self, name)!r}"
                )
        version = int(state.get("version", 1))
        if not same and "consumed" not in state:  # version 1, or a resampled state of version 2
            why = "it was saved by an older xmodal"
            raise ValueError(
                "cannot resume the data stream with a different topology: saved (rank, world_size, "
                f"num_workers) = ({old.rank}, {old.world_size}, {old.num_workers}), now "
                f"({self.topology.rank}, {self.topology.world_size}, {self.topology.num_workers}) and {why}; "
                "resume with the same devices, nodes and data.num_workers, or start the epoch over"
            )
        if version >= 2 and state["index"] != self._index:
            raise ValueError(
                f"cannot resume the data stream: saved for an index of {state['index']['shards']} shards / "
                f"{state['index']['samples']} samples, this one has {self._index['shards']} / "
                f"{self._index['samples']} (or other sizes)"
            )
        epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        if version < 2:  # positional: the batches of this version's order after the saved count
            log.warning(
                "data stream state of an older xmodal: epoch %d continues in this version's order", epoch
            )
            plan_start, plan_batches, base = 0, self.plan(epoch).batches_per_rank, None
        else:
            plan_start, plan_batches = int(state["plan_start"]), int(state["plan_batches"])
            saved_base = state["plan_base"]
            base = consumed_from_state(self.mode, saved_base, self._sizes) if saved_base is not None else None
        if consumed >= plan_start + plan_batches:  # the epoch was finished
            self._resume(epoch + 1, None, 0, 0)
            return
        if same:
            self._resume(epoch, base, plan_start, consumed - plan_start)
            return
        done = consumed_from_state(self.mode, state["consumed"], self._sizes)
        self._resume(epoch, done, consumed, 0)
        rest = self.plan(epoch)
        if isinstance(done, Drawn):
            used, total = done.rows, self.samples_per_epoch or 0
        else:
            used, total = int(self._sizes.sum() - done.remaining(self._sizes).sum()), int(self._sizes.sum())
        log.info(
            "elastic resume of %s epoch %d: %d of %d samples consumed on %d rank(s) x %d worker(s); the "
            "rest as %d batches per rank on %d x %d",
            self.mode,
            epoch,
            used,
            total,
            old.world_size,
            old.workers,
            rest.batches_per_rank,
            self.topology.world_size,
            self.topology.workers,
        )
        if rest.batches_per_rank == 0:  # nothing left that fills a batch (drop_last)
            self._resume(epoch + 1, None, 0, 0)

    def _resume(self, epoch: int, base: Consumed | None, base_batches: int, start: int) -> None:
        """Set the next iteration: ``epoch``, its plan (the rest after ``base``, or whole), plan batch
        ``start``; ``base_batches`` batches of the epoch were run before that plan."""
        self._base, self._base_epoch, self._base_batches = base, epoch, base_batches
        self._base_generation += 1
        self._shared[0] = epoch
        self._shared[1] = start
        self._shared[2] = int(base is not None)
        self._shared[3] = self._base_generation
        self._consumed = base_batches + start
        self._pending_start = start

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
        if self._shared[2] and self._shared[3] != self._base_generation:
            raise RuntimeError(
                "the data stream's resume state was loaded after its persistent DataLoader workers "
                "started: load it before the first iteration (Lightning does)"
            )
        slot = (worker + start) % workers  # keeps the round-robin order of an uninterrupted epoch
        skip = max(0, -(-(start - slot) // workers))
        plan = self.plan(epoch).slot(self.topology.rank, slot)
        yield from self._slot_batches(plan, worker, skip, epoch)

    def _slot_batches(self, plan: SlotPlan, worker: int, skip_batches: int, epoch: int = 0) -> Iterator[Any]:
        state = {"consecutive": 0, "template": None}

        def fail(pos: int, error: Exception) -> None:
            url = plan.shards[pos]
            k = self._shard_ids.get(url, 0)
            self._errors[worker * len(self.shards) + k] += 1
            state["consecutive"] += 1
            self._log_error(k, url, error)
            if state["consecutive"] >= self.max_consecutive_failures:
                raise DataFailure(
                    f"{state['consecutive']} consecutive data failures (max_consecutive_failures="
                    f"{self.max_consecutive_failures}); the last in shard {url}: {error}"
                ) from error

        reader = _SlotReader(plan, fail, self.allow_pipe, self._keep)
        rows: list[dict[str, Any]] = []
        for block in plan.iter_blocks(skip_batches * self.batch_size):
            reader.want(block)
            for s, i, ok in block:
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
        raise DataFailure(
            f"{failures} consecutive data failures while looking for a decodable sample for padding rows "
            f"(max_consecutive_failures={self.max_consecutive_failures}); the last in shard {last[0]}: {last[1]}"
        )

    def _log_error(self, k: int, url: str, error: Exception) -> None:
        now = time.monotonic()
        n = sum(self._errors[w * len(self.shards) + k] for w in range(self.topology.workers))
        if n <= 3 or now - self._last_log.get(k, -math.inf) >= self.log_interval_s:
            self._last_log[k] = now
            log.warning("data error %d in shard %s (sample skipped): %s", n, url, error)
