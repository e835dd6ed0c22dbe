"""Splits carved out of one set of shards by a hash of each sample's key.

A sample's *position* is the first 8 bytes of the SHA-256 of its key read as a fraction of 2**64:
a pure function of the key, so the same key falls in the same split on every run, rank and worker,
whatever the shard order or layout. Ranges, as ``xmodal-shards write --val-fraction`` assigns them
(``xmodal.data.writer.assign_split``): test ``[0, t)``, val ``[t, t + v)``, train ``[t + v, 1)``.
A carved split reads the same shards as the others and keeps only the keys in its range.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

_SCALE = 2**64
KeepRange = tuple[float, float]
"""Positions ``[low, high)`` a carved split keeps."""


def key_position(key: str) -> int:
    """The key's position as an integer in ``[0, 2**64)`` (compared with :func:`bounds`)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def bounds(keep: KeepRange) -> tuple[int, int]:
    """Integer bounds of a range: 1.0 must keep every position (a float of 2**64 - 1 rounds to 1.0)."""
    return int(keep[0] * _SCALE), int(keep[1] * _SCALE)


@dataclass(frozen=True)
class Carve:
    """Fractions of a split's samples carved out as val and test."""

    val: float = 0.0
    test: float = 0.0

    def __post_init__(self) -> None:
        if not (0 <= self.val < 1 and 0 <= self.test < 1 and self.val + self.test < 1):
            raise ValueError(
                f"carve fractions must be >= 0 and sum to < 1 (got val={self.val}, test={self.test})"
            )

    @property
    def active(self) -> bool:
        return self.val > 0 or self.test > 0

    def ranges(self) -> dict[str, KeepRange]:
        """Each split's range; a split with a zero fraction is left out."""
        out = {"train": (self.test + self.val, 1.0)}
        if self.val:
            out["val"] = (self.test, self.test + self.val)
        if self.test:
            out["test"] = (0.0, self.test)
        return out

    def counts(self, keys: Iterable[str]) -> dict[str, int]:
        """Samples per split among ``keys`` (every split of :meth:`ranges`, zeros included)."""
        limits = {split: bounds(keep) for split, keep in self.ranges().items()}
        counts = dict.fromkeys(limits, 0)
        for key in keys:
            position = key_position(key)
            for split, (low, high) in limits.items():
                if low <= position < high:
                    counts[split] += 1
                    break
        return counts


def kept(records: Iterator[dict[str, Any]], keep: KeepRange | None) -> Iterator[dict[str, Any]]:
    """The records whose key falls in ``keep`` (all of them when None)."""
    if keep is None:
        yield from records
        return
    low, high = bounds(keep)
    for record in records:
        if low <= key_position(record["__key__"]) < high:
            yield record
