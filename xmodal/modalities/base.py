"""What a modality is: the shard members it reads, decode, collate, model units, display, inputs.

A **role** is a named use of a modality in a sample: ``image`` (the default role of the image
modality), or ``src`` / ``tgt`` declared in ``data.roles: {src: image, tgt: image}``. Members follow
webdataset's naming: the default role reads ``key.<ext>``, any other role ``key.<role>.<ext>``.
Batch entries are named by role (``batch["src"]``, ``batch["src_mask"]``, ...).

A modality is a stateless object: the options it needs come from the :class:`DecodeSpec`-like
``spec`` it is handed (built-ins read their ``data.*`` fields; plug-ins read
``spec.options[<modality name>]``, i.e. ``data.options.<name>.*``). Loader workers pickle it by
reference, so a plug-in modality must live in an importable module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from xmodal.codecs.json_meta import load_json_member
from xmodal.problems import SkipRow


def json_member_name(raw: dict[str, Any]) -> str:
    """``"<shard>: sample '<key>' member 'json'"``: where a raw sample's metadata came from."""
    return f"{raw.get('__shard__', '<shard>')}: sample {raw.get('__key__', '')!r} member 'json'"


class SampleContext:
    """Per-sample facts a decoder may use (seeded choices must depend on these only).

    A plain slotted class: one is made per decoded sample (a dataclass costs ~1 µs more)."""

    __slots__ = ("key", "epoch", "seed", "train", "raw", "_meta")

    def __init__(self, key: str, epoch: int, seed: int, train: bool, raw: dict[str, Any]):
        self.key, self.epoch, self.seed, self.train, self.raw = key, epoch, seed, train, raw
        self._meta: dict[str, Any] | None = None

    @property
    def meta(self) -> dict[str, Any]:
        """The sample's parsed ``.json`` member ({} without one), parsed once per sample; ValueError
        (a counted skip) naming shard, key and member when it is invalid or nested too deep."""
        if self._meta is None:
            payload = self.raw.get("json")
            meta = {} if payload is None else load_json_member(payload, json_member_name(self.raw))
            if not isinstance(meta, dict):
                raise ValueError(
                    f"{json_member_name(self.raw)}: must be a JSON object, not {type(meta).__name__}"
                )
            self._meta = meta
        return self._meta


class Modality:
    """Base of every modality; override what differs from "one stacked tensor per role"."""

    name: ClassVar[str] = ""
    """Registry name, also the default role."""
    extensions: ClassVar[tuple[str, ...]] = ()
    """Member extensions read, in order of preference (also the shard reader's allow-list)."""
    decoded_always: ClassVar[bool] = False
    """Decode the default role for every sample even when no task asks for it (cheap metadata that
    feeds tables and conditional metrics: captions, labels)."""
    input_flag: ClassVar[str | None] = None
    """``xmodal-generate --<flag>`` that supplies this modality's inputs (None: its name)."""
    input_files: ClassVar[bool] = True
    """The inputs are file paths (checked to exist before the checkpoint loads); else literal values."""
    source_suffixes: ClassVar[tuple[str, ...]] = ()
    """File suffixes (``.wav``) that ``xmodal-shards write`` takes for this modality from a user's
    folder (``x.wav`` next to ``x.jpg``) or from a JSONL/CSV column named after it; empty: the
    writer does not read it from files (``write_member`` is then never called)."""

    def member(self, raw: dict[str, Any], role: str) -> tuple[str, Any] | None:
        """(extension, payload) of the role's member in a raw sample, or None if it has none."""
        for ext in self.extensions:
            name = ext if role == self.name else f"{role}.{ext}"
            if name in raw:
                return ext, raw[name]
        return None

    def decode(self, found: tuple[str, Any], role: str, spec: Any, ctx: SampleContext) -> dict[str, Any]:
        """Sample fields of a present role (``{role: tensor, ...}``); raises ValueError (a counted skip)."""
        raise NotImplementedError

    def is_present(self, fields: dict[str, Any]) -> bool:
        """Whether decoded fields hold real content (a JSON without captions holds no text)."""
        return True

    def absent(self, role: str, spec: Any) -> dict[str, Any]:
        """Fields of an optional role the sample lacks (masked by ``<role>_present`` False)."""
        raise NotImplementedError

    def missing_message(self, key: str, role: str) -> str:
        return f"sample {key!r} has no {role}"

    def collate(self, rows: list[dict[str, Any]], role: str, collate: Any) -> dict[str, Any]:
        """Batch entries of a role; ``collate`` is the BatchCollate (tokenizer, max_text_len)."""
        return {role: torch.stack([r[role] for r in rows])}

    def to_model_units(self, batch: dict[str, Any], role: str) -> None:
        """Convert the role's entries in place once the batch is on the task's device."""

    def show(self, values: torch.Tensor) -> torch.Tensor:
        """Batch values → images ``[B, C, H, W]`` in [-1, 1] for sample grids."""
        raise NotImplementedError(f"modality {self.name!r} has no image display")

    def animate(self, values: torch.Tensor) -> torch.Tensor | None:
        """Batch values → clips ``[B, T, C, H, W]`` in [-1, 1] for animated samples (GIF, W&B
        video), or None for a modality without time to show (the default: stills only)."""
        return None

    def output_files(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> list[tuple[str, bytes]]:
        """Generated values (model units, ``[B, ...]``) → one ``(extension, bytes)`` file per row
        that a person opens beside the ``show`` image (a WAV to listen to); ``mask``: the role's
        mask when it has one (audio frames). Default: none ([])."""
        return []

    def read_inputs(self, values: list[Any], role: str, spec: Any, collate: Any) -> dict[str, Any]:
        """A batch (model units) holding ``role`` from ``xmodal-generate`` inputs: file paths by
        default. Raises ValueError naming the input that cannot be read."""
        rows = []
        for value in values:
            path = Path(value)
            found = self.member({path.suffix.lstrip(".").lower(): path.read_bytes()}, self.name)
            if found is None:
                raise ValueError(
                    f"{path}: not a file the {self.name} modality reads ({', '.join(self.extensions)})"
                )
            ctx = SampleContext(str(path), 0, 0, False, {})
            rows.append(self.decode(found, role, spec, ctx))
        batch = self.collate(rows, role, collate)
        self.to_model_units(batch, role)
        return batch

    def write_member(self, path: Path, options: Any) -> tuple[str, bytes]:
        """``(extension, bytes)`` of the shard member ``xmodal-shards write`` makes from a user's
        file (``options``: the writer's ``WriteOptions``). Raises ``xmodal.problems.SkipRow`` for a
        file that cannot be written (a counted skip). Default: the bytes as they are, when the
        suffix is one the modality reads."""
        ext = path.suffix.lstrip(".").lower()
        if ext not in self.extensions:
            raise SkipRow(f"bad {self.name}", f"{path}: unsupported type (use {', '.join(self.extensions)})")
        try:
            data = path.read_bytes()
        except OSError as error:
            raise SkipRow(f"missing {self.name}", f"{path}: {error.strerror or error}") from None
        if not data:
            raise SkipRow(f"bad {self.name}", f"{path} is empty")
        return ext, data

    def problems(self, cfg: Any) -> list[str]:
        """Problems of the ``data.*`` keys this modality reads (checked for every registered modality)."""
        return []
