"""What a source holds, checked: every shard scanned once (backs ``xmodal-shards inspect``/``index``).

Beyond what a run needs (``xmodal.data.splits``), a survey scans every shard even when the source
states its counts, so an index that lies is reported both ways (a shard holding more samples than
it says, or fewer), and counts every member kind once, saying which modality reads it and which
are ignored (never decoded, never unpickled).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from xmodal.data.index import ShardCounts, index_shards
from xmodal.data.shards import CODE_BEARING, NO_EXTENSION, is_pipe
from xmodal.data.splits import DataSplits, SplitSettings, resolve_splits


@dataclass
class Survey:
    data: DataSplits
    counts: dict[str, ShardCounts]
    """Every scanned shard (pipe: shards are not run unless allowed)."""
    kinds: Counter[str] = field(default_factory=Counter)
    mismatches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dotted: int = 0


def survey(spec: str, settings: SplitSettings) -> Survey:
    """Resolve ``spec`` as a run would, then scan all of its shards (cached like a run's index)."""
    data = resolve_splits(spec, settings)
    urls = sorted({sh.url for shards in data.splits.values() for sh in shards} | set(data.source.urls()))
    scannable = [u for u in urls if settings.allow_pipe or not is_pipe(u)]
    counts = index_shards(scannable, None, settings.index_dir, settings.allow_pipe)
    result = Survey(data, counts)
    stated = data.source.stated
    for url, c in counts.items():
        result.kinds.update(c.kinds)
        result.dotted += c.dotted
        if c.error:
            result.errors.append(f"{url}: readable up to sample {c.samples} only: {c.error}")
        if url in stated and stated[url] != c.samples:
            diff = c.samples - stated[url]
            what = (
                f"{diff} more: a run would not read them"
                if diff > 0
                else f"{-diff} fewer: a run pads their rows and counts them as failures"
            )
            result.mismatches.append(
                f"{url}: holds {c.samples} samples, its index ({data.source.kind}) says {stated[url]} ({what})"
            )
    return result


def member_reader(kind: str, extensions: dict[str, str]) -> str:
    """Who reads members of ``kind``; ``extensions`` maps each extension to its modality."""
    if kind == NO_EXTENSION:
        return "ignored: not a key.extension name (webdataset skips these too)"
    role, dot, last = kind.rpartition(".")
    if last in CODE_BEARING:
        return "ignored: a code-bearing format (pickle, torch.load): never read"
    if kind in extensions:
        return extensions[kind]
    if dot and last in extensions:
        return f"{extensions[last]} as role {role!r} when data.roles names it, else ignored"
    return f"ignored: no modality reads .{last}"
