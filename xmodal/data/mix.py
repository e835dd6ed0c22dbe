"""Several datasets in one run (``data.sources``): each resolved and split as ``data.shards`` is,
training drawn by weight, validation and test concatenated.

``resolve_mix(specs, settings)`` → :class:`Mix`. Every source goes through
``xmodal.data.splits.resolve_splits`` on its own (its folders or index, or carving by key hash with
the run's ``data.val_fraction``/``data.test_fraction``), so a source's val/test keys never reach
training. ``data.val_shards`` / ``data.test_shards`` (one held-out set for the whole mix, COCO val
say) replace the sources' own val/test: the sources then need no such split, none is carved from
them (``source_settings``: that fraction is 0 unless set, and setting it > 0 beside the explicit
shards is refused, as for one source), and an explicit shard that is a source's training shard is
refused. Then:

- ``Mix.data``: one :class:`DataSplits` whose splits are the sources' splits concatenated (source
  order), or the explicit shards, what evaluation and the tokenizer's fit read;
- ``Mix.train(mode)``: the training shard list the epoch plan takes. ``exact``: a source of weight
  ``w`` (a whole number) lists each of its shards ``w`` times, so each of its samples appears ``w``
  times per epoch; the plan stays O(shards × w) and the stream already reads a repeated shard as
  separate pieces. ``resampled``: each shard once, weighted ``w / N`` (``N``: its source's train
  samples), so source ``i`` yields ``w_i / Σ w`` of the drawn samples, spread over its shards by
  size (the plan draws whole shards and yields each one's samples).
- ``source_draws(plan, train)``: the samples an epoch plan draws per source (padding excluded), the
  per-source counts the data module logs and ``xmodal-shards plan`` prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from xmodal.data.epoch_plan import EpochPlan, ShardInfo
from xmodal.data.splits import (
    DataSplits,
    ExplicitSplit,
    SplitSettings,
    check_apart,
    explicit_splits,
    resolve_explicit,
    resolve_splits,
)


@dataclass(frozen=True)
class SourceSpec:
    """One ``data.sources`` entry, its name settled (``source_names``)."""

    shards: str
    weight: float = 1.0
    name: str = "data"


@dataclass(frozen=True)
class TrainMix:
    """The training shards the epoch plan reads, with their weights and sources."""

    shards: tuple[ShardInfo, ...]
    weights: tuple[float, ...] | None
    """Per shard (resampled mode); None in exact mode (repetition carries the weights)."""
    source: np.ndarray  # int64 [shards]: index into ``names`` of each listed shard
    names: tuple[str, ...]


def source_names(shards: Sequence[str], names: Sequence[str | None]) -> list[str]:
    """Each source's name: the one given, else its data's folder name (``dataset_name``); a default
    name that repeats gets ``_2``, ``_3`` ... in order, so every source is told apart in logs."""
    from xmodal.data.resolve import dataset_name

    out: list[str] = []
    for spec, name in zip(shards, names, strict=True):
        base = name if name else dataset_name(spec)
        candidate, n = base, 1
        while not name and candidate in out + [g for g in names if g]:
            n += 1
            candidate = f"{base}_{n}"
        out.append(candidate)
    return out


@dataclass
class Mix:
    """The resolved sources of a run (module docstring)."""

    specs: tuple[SourceSpec, ...]
    parts: tuple[DataSplits, ...]
    explicit: dict[str, ExplicitSplit] = field(default_factory=dict)
    """``data.val_shards``/``test_shards``: the run's split, in place of the sources' own."""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.specs)

    @cached_property
    def data(self) -> DataSplits:
        """Every split of every source, concatenated in source order; warnings name their source."""
        order = list(
            dict.fromkeys([*(split for part in self.parts for split in part.splits), *self.explicit])
        )
        splits: dict[str, list[ShardInfo]] = {}
        how: dict[str, str] = {}
        groups: dict[str, tuple[int, ...]] = {}
        for split in order:
            if split in self.explicit:
                splits[split] = list(self.explicit[split].shards)
                how[split] = f"data.{split}_shards ({self.explicit[split].spec}), for every source"
                continue
            having = [
                (spec, part)
                for spec, part in zip(self.specs, self.parts, strict=True)
                if split in part.splits
            ]
            splits[split] = [sh for _, part in having for sh in part.splits[split]]
            how[split] = "; ".join(f"{spec.name}: {part.how[split]}" for spec, part in having)
            groups[split] = tuple(len(part.splits[split]) for _, part in having)
        first = self.parts[0]
        return DataSplits(
            spec=" + ".join(spec.shards for spec in self.specs),
            source=first.source,
            splits=splits,
            how=how,
            carve=first.carve,
            counts={
                **{url: c for part in self.parts for url, c in part.counts.items()},
                **{url: c for ex in self.explicit.values() for url, c in ex.counts.items()},
            },
            warnings=[
                *(
                    f"{spec.name}: {w}"
                    for spec, part in zip(self.specs, self.parts, strict=True)
                    for w in part.warnings
                ),
                *(f"data.{split}_shards: {w}" for split, ex in self.explicit.items() for w in ex.warnings),
            ],
            groups=groups,
        )

    def train(self, mode: str) -> TrainMix:
        """The training shards for ``mode`` (module docstring). ValueError names a source whose train
        split is empty, or an exact-mode weight that is not a whole number."""
        shards: list[ShardInfo] = []
        source: list[int] = []
        weights: list[float] = []
        for i, (spec, part) in enumerate(zip(self.specs, self.parts, strict=True)):
            own = part.shards("train")
            total = sum(sh.num_samples for sh in own)
            if total == 0:
                raise ValueError(f"data.sources[{i}] ({spec.name}): its train split holds no samples")
            if mode == "exact":
                if not float(spec.weight).is_integer() or spec.weight < 1:
                    raise ValueError(exact_weight_error(i, spec.weight))
                repeat = int(spec.weight)
            else:
                repeat = 1
                weights += [spec.weight / total] * len(own)
            shards += own * repeat
            source += [i] * (len(own) * repeat)
        return TrainMix(
            tuple(shards),
            tuple(weights) if mode != "exact" else None,
            np.asarray(source, dtype=np.int64),
            self.names,
        )


def exact_weight_error(index: int, weight: float) -> str:
    """The one line refusing a weight exact mode cannot honour."""
    return (
        f"data.sources[{index}].weight: must be a whole number >= 1 in exact mode (each sample of the "
        f"source appears weight times per epoch); use data.mode=resampled for fractional weights (got {weight!r})"
    )


def source_settings(settings: SplitSettings) -> SplitSettings:
    """How each source of a mix is split: without the explicit val/test shards (they are the mix's,
    not a source's) and carving none of the splits they give. ValueError when a fraction > 0 is
    set beside its explicit shards (the split would be given twice)."""
    explicit = explicit_splits(settings)
    fractions = {"val": settings.val_fraction, "test": settings.test_fraction}
    for split in explicit:
        if fractions[split]:
            raise ValueError(
                f"data.{split}_fraction={fractions[split]}: data.{split}_shards is the {split} split of "
                f"every source; leave data.{split}_fraction unset or 0"
            )
    return replace(
        settings,
        val_shards=None,
        test_shards=None,
        val_fraction=0.0 if "val" in explicit else settings.val_fraction,
        test_fraction=0.0 if "test" in explicit else settings.test_fraction,
    )


def resolve_mix(specs: Sequence[SourceSpec], settings: SplitSettings | None = None) -> Mix:
    """Every source resolved and split as ``data.shards`` is, and the explicit val/test shards on
    their own (module docstring); errors name ``data.sources[i]`` or the explicit key."""
    if not specs:
        raise ValueError("data.sources: lists no source")
    settings = settings or SplitSettings()
    own = source_settings(settings)
    parts = []
    for i, spec in enumerate(specs):
        try:
            parts.append(resolve_splits(spec.shards, own))
        except (ValueError, OSError) as error:
            raise type(error)(f"data.sources[{i}].shards: {error}") from error
    explicit = {split: resolve_explicit(split, settings) for split in explicit_splits(settings)}
    for split, ex in explicit.items():
        for i, (spec, part) in enumerate(zip(specs, parts, strict=True)):
            trained = [sh.url for sh in part.splits.get("train", [])]
            check_apart(
                split, [sh.url for sh in ex.shards], trained, f"data.sources[{i}] ({spec.name})'s train split"
            )
    return Mix(tuple(specs), tuple(parts), explicit)


def source_draws(plan: EpochPlan, train: TrainMix) -> dict[str, int]:
    """Samples the epoch plan draws from each source, over every rank and worker (padding rows
    excluded). O(shards drawn): a slot yields its pieces' samples in order up to its real rows."""
    drawn = np.zeros(len(train.names), dtype=np.int64)
    sizes = np.asarray([sh.num_samples for sh in plan.shard_list], dtype=np.int64)
    left = sizes if plan.consumed is None else plan.consumed.remaining(sizes)
    for positions, rows in zip(plan.slot_shards, plan.slot_rows, strict=True):
        take = np.minimum(
            left[positions], np.maximum(rows - np.concatenate([[0], np.cumsum(left[positions])[:-1]]), 0)
        )
        np.add.at(drawn, train.source[positions], take)
    return dict(zip(train.names, drawn.tolist(), strict=True))
