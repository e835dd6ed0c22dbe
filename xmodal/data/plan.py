"""Dry-run the streaming loader for a world size × workers layout (backs ``xmodal-shards plan``).

``plan_report`` runs the real ``ShardStream`` of every rank, worker by worker, in this process (via
``ShardStream.iter_worker``, the hook a DataLoader worker uses), on raw records (no decoding), and
interleaves the workers' batches round-robin as a DataLoader does. So the counts it reports are what
a training job would see, bad shards included, and ``dump_keys`` lists the exact sample order.
Several sources (``data.sources``, ``xmodal.data.mix``) are planned as a run mixes them, and the
report gives each source's planned draws and the samples it actually yielded.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xmodal.data.epoch_plan import Topology
from xmodal.data.mix import SourceSpec, TrainMix, resolve_mix, source_draws
from xmodal.data.splits import SplitSettings, resolve_splits
from xmodal.data.stream import ShardStream


def _keys_only(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {
        "__key__": [r["__key__"] for r in rows],
        "__shard__": [r.get("__shard__") for r in rows],
        "valid": [bool(r["valid"]) for r in rows],
    }


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
    sources: Sequence[SourceSpec] = (),
) -> dict[str, Any]:
    """Per-rank batch/row/valid counts of one epoch, plus the plan's warnings and exact-once checks.

    Returns ``{"shard_dir", "split", "mode", "world_size", "num_workers", "batch_size", "seed", "epoch",
    "num_shards", "num_samples", "ranks": [{"rank", "batches", "rows", "valid", "padding"}, ...],
    "batches_equal", "duplicates", "missing" (exact mode: real keys seen twice / never; else None),
    "skipped" {shard: rows}, "padding", "dropped", "warnings"}``.
    With ``dump_keys``, writes one line per yielded row: ``rank worker epoch key valid`` (valid 1/0),
    in the order the rank's DataLoader would hand them out. ``settings``: how splits are found
    (default: as a run with default ``data.*`` keys, carving a missing val/test split).
    ``sources`` (instead of ``shard_dir``): mixed as ``data.sources`` are; the report then has
    ``"sources": [{"name", "weight", "planned", "yielded"}, ...]`` (samples over all ranks).
    Exact-once checks count a sample as often as its shard is listed (a source's exact weight).
    """
    mix = resolve_mix(sources, settings) if sources else None
    data = mix.data if mix is not None else resolve_splits(shard_dir, settings or SplitSettings())
    train: TrainMix | None = mix.train(mode) if mix is not None and split == "train" else None
    shards = list(train.shards) if train is not None else data.shards(split)
    listed = collections.Counter(sh.url for sh in shards)  # times each sample is due
    ranks, skipped, seen = [], collections.Counter(), collections.Counter()
    planned: dict[str, int] = {}
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
            weights=train.weights if train is not None else None,
            drop_last=drop_last,
            allow_pipe=(settings or SplitSettings()).allow_pipe,
        )
        stream.set_epoch(epoch)
        plan = stream.plan()
        if rank == 0:
            warnings, padding, dropped = [*data.warnings, *plan.warnings], plan.padding, plan.dropped
            planned = source_draws(plan, train) if train is not None else {}
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
                for key, shard, valid in zip(
                    batch["__key__"], batch["__shard__"], batch["valid"], strict=True
                ):
                    counts["rows"] += 1
                    counts["valid" if valid else "padding"] += 1
                    if valid:
                        seen[shard, key] += 1
                    lines.append(f"{rank} {worker} {epoch} {key} {int(valid)}")
            iterators = alive
        skipped.update(stream.skip_counts())
        ranks.append(counts)
    total = sum(sh.num_samples for sh in shards)
    exact = mode == "exact"
    due = sum(min(n, listed[shard]) for (shard, _), n in seen.items())
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
        "duplicates": sum(max(n - listed[shard], 0) for (shard, _), n in seen.items()) if exact else None,
        "missing": total - due - dropped - sum(skipped.values()) if exact else None,
        "skipped": dict(skipped),
        "padding": padding,
        "dropped": dropped,
        "warnings": warnings,
    }
    if train is not None:
        source_of = {}
        for sh, i in zip(shards, train.source.tolist(), strict=True):
            source_of.setdefault(sh.url, i)
        yielded: collections.Counter[int] = collections.Counter()
        for (shard, _), n in seen.items():
            yielded[source_of[shard]] += n
        report["sources"] = [
            {"name": spec.name, "weight": spec.weight, "planned": planned[spec.name], "yielded": yielded[i]}
            for i, spec in enumerate(mix.specs)  # type: ignore[union-attr]
        ]
        report["shard_dir"] = data.spec
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
    if report.get("sources"):
        _print_sources(report["sources"], report["mode"], console)
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


def _print_sources(sources: list[dict[str, Any]], mode: str, console: Any) -> None:
    """Each source's weight and share of the epoch's samples: the share its weight asks for
    (resampled: weight / Σ weights; exact: weight repeats of each sample), planned and yielded."""
    from rich.table import Table

    planned = max(sum(s["planned"] for s in sources), 1)
    yielded = max(sum(s["yielded"] for s in sources), 1)
    weights = sum(s["weight"] for s in sources)
    table = Table(title=f"sources ({mode}: {_MEANING[mode]})")
    for column in ("source", "weight", "asked share", "planned", "planned share", "yielded", "yielded share"):
        table.add_column(column, justify="left" if column == "source" else "right")
    for s in sources:
        asked = s["weight"] / weights if mode == "resampled" else s["planned"] / planned
        table.add_row(
            s["name"],
            f"{s['weight']:g}",
            f"{asked:.1%}",
            str(s["planned"]),
            f"{s['planned'] / planned:.1%}",
            str(s["yielded"]),
            f"{s['yielded'] / yielded:.1%}",
        )
    console.print(table)


_MEANING = {
    "resampled": "a source's share of the drawn samples is its weight / the sum of weights",
    "exact": "each sample of a source appears weight times per epoch",
}
