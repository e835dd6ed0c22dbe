"""A collector of config problems, each reported as ``<key>: <why> (got <value>)``.

Shared by the central validator (xmodal/config/validate.py) and every task's and modality's own
``problems()``, so all of them read the same and are reported together before any rank starts.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf


class Problems(list):
    """A list of problem lines that knows the root config, to quote the offending value."""

    def __init__(self, cfg: Any):
        super().__init__()
        self.cfg = cfg

    def check(self, ok: bool, key: str, why: str) -> None:
        """Add ``key: why (got value)`` unless ``ok``; ``key`` is a dotted path from the root."""
        if not ok:
            self.append(f"{key}: {why} (got {OmegaConf.select(self.cfg, key)!r})")

    def one_of(self, key: str, allowed: tuple[str, ...] | list[str]) -> None:
        self.check(OmegaConf.select(self.cfg, key) in allowed, key, f"must be one of {tuple(allowed)}")


def unknown_keys(node: Mapping[str, Any], schema: type, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, name of the dataclass that lacks it) for every key of ``node`` that ``schema``
    and its nested dataclasses do not declare."""
    types = typing.get_type_hints(schema)
    unknown = []
    for key, value in node.items():
        if key not in types:
            unknown.append((f"{prefix}{key}", schema.__name__))
        elif dataclasses.is_dataclass(types[key]) and isinstance(value, Mapping):
            unknown += unknown_keys(value, types[key], f"{prefix}{key}.")
    return unknown


class SkipRow(Exception):
    """A user's row or file that cannot be written into shards: a counted skip, never fatal alone.

    ``reason`` is a counter key of the write report (``"missing image"``); ``detail`` names the file.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
