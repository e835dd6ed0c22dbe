"""Time and memory to plan an epoch, and to a first batch, as the index grows (issue 20).

    PYTHONPATH=. python benchmarks/plan_scale.py                # this tree
    PYTHONPATH=/path/to/old/tree python benchmarks/plan_scale.py --max-samples 8000000  # before

Per case (shards x samples per shard), each in a fresh process so its peak RSS is its own:

- plan: ``plan_epoch`` (sizes only, no tar) for 1 rank x 2 workers, batch 64, shuffle buffer 1000, and
  slot 0's first batch of rows: wall time and tracemalloc peak (a second run, traced).
- stream (up to ``--max-stream-shards`` shards): ``ShardStream`` built and worker 0's first batch read,
  as a DataLoader worker does at epoch start. Every shard file is a symlink to one 768-record tar, so
  an index of 10,000 shards costs one tar on disk; only the shards the first batch needs are read.
  Wall time and the process's peak RSS.

- webdataset (``--no-webdataset`` to skip): its recommended pipeline on the same index (shard shuffle,
  a 1,000-sample shuffle buffer, batches of 64), time to its first batch and peak RSS.

The 100,000 x 1,000 case is a LAION-scale index (100 M samples) planned on paper.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

CASES = [(8, 768), (512, 768), (10_000, 768), (100_000, 1_000)]
BATCH = 64


def first_rows(plan) -> list:
    """Slot (0, 0)'s first batch of rows, in whichever API the tree has (lazy now, arrays before)."""
    slot = plan.slot(0, 0)
    if hasattr(slot, "iter_rows"):
        return list(itertools.islice(slot.iter_rows(), BATCH))
    return list(zip(slot.shard[:BATCH].tolist(), slot.index[:BATCH].tolist(), strict=True))


def measure_plan(num_shards: int, per_shard: int) -> dict:
    from xmodal.data.epoch_plan import ShardInfo, Topology, plan_epoch

    shards = [ShardInfo(f"/data/shard-{k:06d}.tar", per_shard) for k in range(num_shards)]
    start = time.perf_counter()
    first_rows(plan_epoch(shards, "exact", 0, 0, Topology(0, 1, 2), BATCH))
    seconds = time.perf_counter() - start
    tracemalloc.start()
    first_rows(plan_epoch(shards, "exact", 0, 0, Topology(0, 1, 2), BATCH))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"plan_s": seconds, "plan_peak_mb": peak / 2**20}


def one_tar(path: Path, records: int) -> None:
    """A shard as any tar tool writes it: one small text member per record."""
    with tarfile.open(path, "w") as tar:
        for i in range(records):
            data = f"caption {i}".encode()
            info = tarfile.TarInfo(f"{i:06d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def symlinked_index(folder: Path, num_shards: int, per_shard: int) -> list[str]:
    """``num_shards`` shard paths in ``folder``, every one a symlink to one ``per_shard``-record tar."""
    real = folder / "real.tar"
    one_tar(real, per_shard)
    urls = []
    for k in range(num_shards):
        link = folder / f"shard-{k:06d}.tar"
        link.symlink_to(real)
        urls.append(str(link))
    return urls


def measure_stream(num_shards: int, per_shard: int) -> dict:
    from xmodal.data.epoch_plan import ShardInfo, Topology
    from xmodal.data.stream import ShardStream

    with tempfile.TemporaryDirectory() as tmp:
        urls = symlinked_index(Path(tmp), num_shards, per_shard)
        shards = [ShardInfo(url, per_shard) for url in urls]
        start = time.perf_counter()
        stream = ShardStream(shards, "exact", 0, Topology(0, 1, 2), BATCH)
        batch = next(stream.iter_worker(0))
        seconds = time.perf_counter() - start
        assert len(batch["__key__"]) == BATCH
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"first_batch_s": seconds, "rss_mb": rss}


def measure_webdataset(num_shards: int, per_shard: int) -> dict:
    """webdataset's recommended pipeline on the same index: shard shuffle, a 1,000-sample shuffle
    buffer (as ours), batches of 64; time to its first batch and the process's peak RSS."""
    import webdataset as wds

    with tempfile.TemporaryDirectory() as tmp:
        urls = symlinked_index(Path(tmp), num_shards, per_shard)
        start = time.perf_counter()
        dataset = wds.WebDataset(urls, shardshuffle=num_shards, seed=0, empty_check=False)
        batch = next(iter(dataset.shuffle(1000).batched(BATCH, collation_fn=list)))
        seconds = time.perf_counter() - start
        assert len(batch) == BATCH
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"wds_first_batch_s": seconds, "wds_rss_mb": rss}


def run_case(num_shards: int, per_shard: int, stream: bool, reader: str = "xmodal") -> dict:
    if reader == "webdataset":
        return {"shards": num_shards, "per_shard": per_shard, **measure_webdataset(num_shards, per_shard)}
    out = {"shards": num_shards, "per_shard": per_shard, **measure_plan(num_shards, per_shard)}
    if stream:
        out.update(measure_stream(num_shards, per_shard))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-samples", type=int, default=10**9, help="skip cases with more samples")
    parser.add_argument("--max-stream-shards", type=int, default=10_000)
    parser.add_argument("--case", nargs=2, type=int, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--reader", default="xmodal", help=argparse.SUPPRESS)  # child process
    parser.add_argument("--no-webdataset", action="store_true", help="skip webdataset's columns")
    args = parser.parse_args()
    if args.case:
        n, per = args.case
        print(json.dumps(run_case(n, per, n <= args.max_stream_shards, args.reader)))
        return
    print(
        f"{'shards':>8} {'x samples':>10} {'plan s':>8} {'plan peak MB':>13} {'1st batch s':>12} {'RSS MB':>8}"
        f" {'wds 1st batch s':>16} {'wds RSS MB':>11}"
    )
    for n, per in CASES:
        if n * per > args.max_samples:
            print(f"{n:>8} {per:>10}  skipped (--max-samples)")
            continue
        cmd = [sys.executable, __file__, "--case", str(n), str(per)]
        cmd += ["--max-stream-shards", str(args.max_stream_shards)]
        result = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, check=True)
        r = json.loads(result.stdout.strip().splitlines()[-1])
        stream = (
            f"{r['first_batch_s']:>12.2f} {r['rss_mb']:>8.0f}"
            if "first_batch_s" in r
            else f"{'-':>12} {'-':>8}"
        )
        wds = f"{'-':>16} {'-':>11}"
        if not args.no_webdataset and n <= args.max_stream_shards:
            cmd = [sys.executable, __file__, "--case", str(n), str(per), "--reader", "webdataset"]
            result = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, check=True)
            w = json.loads(result.stdout.strip().splitlines()[-1])
            wds = f"{w['wds_first_batch_s']:>16.2f} {w['wds_rss_mb']:>11.0f}"
        line = f"{n:>8} {per:>10} {r['plan_s']:>8.3f} {r['plan_peak_mb']:>13.2f} {stream} {wds}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
