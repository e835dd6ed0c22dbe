"""Files other processes may read while we write them: written whole or not at all."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any


def write_json_atomic(path: str | os.PathLike[str], payload: Any, sort_keys: bool = True) -> Path:
    """Write JSON through a temporary file unique to this writer, then rename it into place.

    A reader never sees half a file, and two processes writing the same path at once each
    replace it whole (the last rename wins).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=sort_keys) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
