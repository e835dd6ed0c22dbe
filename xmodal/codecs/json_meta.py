"""JSON metadata members (``key.json``) → Python objects, with a nesting limit.

``json.loads`` recurses once per nesting level, so a member of ``[[[[...`` a few thousand deep
raises ``RecursionError`` (not a ValueError), which crashes whatever reads it instead of being a
skipped sample. The depth is checked first; every failure here is a ``ValueError`` naming the member.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_JSON_DEPTH = 64
"""Nesting levels a metadata member may have (captions and labels need 2)."""

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


def json_depth(payload: bytes) -> int:
    """The deepest nesting of ``[`` / ``{`` in ``payload``, brackets inside strings ignored."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRING.sub(b'""', payload)):
        if bracket in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def load_json_member(payload: bytes | str, where: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The parsed member, or ValueError ``"<where>: ..."`` (invalid JSON, or nested too deep).

    ``where`` names the member for the message (``"shard.tar: sample 'k' member 'json'"``).
    """
    data = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
    # Fast path: with no more opening brackets than the limit the nesting cannot exceed it (C-speed
    # counts; a caption JSON has two), so the bracket scan runs only on unusual members.
    if data.count(b"[") + data.count(b"{") > max_depth and json_depth(data) > max_depth:
        raise ValueError(f"{where}: JSON nested deeper than {max_depth} levels (refused unread)")
    try:
        return json.loads(data)
    except RecursionError:  # a depth the scan missed (cannot happen for valid JSON): still a skip
        raise ValueError(f"{where}: JSON nested too deep to parse") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{where}: not valid JSON ({error})") from None
