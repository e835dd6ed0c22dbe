"""Dry-run the streaming loader for a world size × workers layout (backs ``xmodal-shards plan``).

``plan_report`` runs the real ``ShardStream`` of every rank, worker by worker, in this process (via
``ShardStream.iter_worker``, the hook a DataLoader worker uses), on raw records (no decoding), and
interleaves the workers' batches round-robin as a DataLoader does. So the counts it reports are what
a training job would see, bad shards included, and ``dump_keys`` lists the exact sample order.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

from xmodal.data.epoch_plan import Topology
from xmodal.data.splits import SplitSettings, resolve_splits
from xmodal.data.stream import ShardStream


def _keys_only(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {"__key__": [r["__key__"] for r in rows], "valid": [bool(r["valid"]) for r in rows]}


def plan_report(
    shard_dir: str | os.PathLike[str],
    world_size: int,
    num_workers: int,
    mode: str = "exact",
    batch_size: int = 32,
    split: str = "train",
    seed: int = 0,
    epoch: int = 0,
    dump_keys: Path | None = None,
    samples_per_epoch: int | None = None,
    drop_last: bool = False,
    settings: SplitSettings | None = None,
) -> dict[str, Any]:
    """Per-rank batch/row/valid counts of one epoch, plus the plan's warnings and exact-once checks.

    Returns ``{"shard_dir", "split", "mode", "world_size", "num_workers", "batch_size", "seed", "epoch",
    "num_shards", "num_samples", "ranks": [{"rank", "batches", "rows", "valid", "padding"}, ...],
    "batches_equal", "duplicates", "missing" (exact mode: real keys seen twice / never; else None),
    "skipped" {shard: rows}, "padding", "dropped", "warnings"}``.
    With ``dump_keys``, writes one line per yielded row: ``rank worker epoch key valid`` (valid 1/0),
    in the order the rank's DataLoader would hand them out. ``settings``: how splits are found
    (default: as a run with default ``data.*`` keys, carving a missing val/test split).
    """
    data = resolve_splits(shard_dir, settings or SplitSettings())
    shards = data.shards(split)
    ranks, skipped, seen = [], collections.Counter(), collections.Counter()
    warnings: list[str] = []
    padding = dropped = 0
    lines: list[str] = []
    for rank in range(world_size):
        topology = Topology(rank, world_size, num_workers)
        stream = ShardStream(
            shards,
            mode,
            seed,
            topology,
            batch_size,
            collate=_keys_only,
            samples_per_epoch=samples_per_epoch,
            drop_last=drop_last,
            allow_pipe=(settings or SplitSettings()).allow_pipe,
        )
        stream.set_epoch(epoch)
        plan = stream.plan()
        if rank == 0:
            warnings, padding, dropped = [*data.warnings, *plan.warnings], plan.padding, plan.dropped
        counts = {"rank": rank, "batches": 0, "rows": 0, "valid": 0, "padding": 0}
        iterators = [(w, stream.iter_worker(w)) for w in range(topology.workers)]
        while iterators:  # round-robin over workers, as the DataLoader hands batches out
            alive = []
            for worker, iterator in iterators:
                batch = next(iterator, None)
                if batch is None:
                    continue
                alive.append((worker, iterator))
                counts["batches"] += 1
                for key, valid in zip(batch["__key__"], batch["valid"], strict=True):
                    counts["rows"] += 1
                    counts["valid" if valid else "padding"] += 1
                    if valid:
                        seen[key] += 1
                    lines.append(f"{rank} {worker} {epoch} {key} {int(valid)}")
            iterators = alive
        skipped.update(stream.skip_counts())
        ranks.append(counts)
    total = sum(sh.num_samples for sh in shards)
    exact = mode == "exact"
    report = {
        "shard_dir": str(shard_dir),
        "split": split,
        "mode": mode,
        "world_size": world_size,
        "num_workers": num_workers,
        "batch_size": batch_size,
        "seed": seed,
        "epoch": epoch,
        "num_shards": len(shards),
        "num_samples": total,
        "ranks": ranks,
        "batches_equal": len({r["batches"] for r in ranks}) == 1,
        "duplicates": sum(n - 1 for n in seen.values() if n > 1) if exact else None,
        "missing": total - len(seen) - dropped - sum(skipped.values()) if exact else None,
        "skipped": dict(skipped),
        "padding": padding,
        "dropped": dropped,
        "warnings": warnings,
    }
    if dump_keys is not None:
        Path(dump_keys).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return report


def print_plan(report: dict[str, Any], console: Any = None) -> None:
    """Show a ``plan_report`` as a rich table, followed by its warnings."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    title = (
        f"{report['split']} of {report['shard_dir']}: {report['num_samples']} samples in "
        f"{report['num_shards']} shards, {report['mode']} mode, {report['world_size']} rank(s) x "
        f"{report['num_workers']} worker(s), batch {report['batch_size']}, epoch {report['epoch']}"
    )
    table = Table(title=title)
    for column in ("rank", "batches", "rows", "valid", "padding"):
        table.add_column(column, justify="right")
    for r in report["ranks"]:
        table.add_row(*(str(r[c]) for c in ("rank", "batches", "rows", "valid", "padding")))
    console.print(table)
    console.print(
        f"batches equal on all ranks: {report['batches_equal']}; dropped (drop_last): {report['dropped']}; "
        f"skipped (bad data): {sum(report['skipped'].values())}"
    )
    if report["duplicates"] is not None:
        console.print(f"exact-once: {report['duplicates']} duplicates, {report['missing']} missing")
    for shard, n in sorted(report["skipped"].items()):
        console.print(f"[yellow]skipped {n} rows in {shard}[/yellow]")
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}")
