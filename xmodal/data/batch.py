"""Raw tar records → decoded samples → batches, over the roles a task needs (no modality by name).

Which roles are decoded (:class:`DecodeSpec`): ``required`` ones come from the task (a captioner
needs its source and ``text``; a text→image GAN ``image`` and ``text``): a sample missing one is
skipped and counted, never silently padded. ``optional`` ones are decoded when present and
masked when absent (``<role>_present`` False in the batch). Modalities marked ``decoded_always``
(captions, labels: cheap, they feed tables and conditional metrics) are decoded for every sample.
Every other member is left undecoded (no cost).

Batch: one entry per role as its modality collates it (``image`` uint8 ``[B, C, H, W]``, ``audio``
``[B, 1, M, T]`` + ``audio_mask``, ``text`` ``[B, T]`` + ``text_mask`` + ``captions``, ``label``
``[B]``, ...), plus ``<role>_present`` for optional roles, ``valid`` bool ``[B]``, ``__key__`` and
``__shard__`` (the shard each row was read from, for diagnosis; None for ``xmodal-generate`` inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from xmodal.codecs.pixels import MAX_IMAGE_PIXELS
from xmodal.modalities.base import SampleContext
from xmodal.modalities.roles import always_decoded_roles, modality_of
from xmodal.tokenizers.base import Tokenizer

ROLES_FIELD = "__roles__"
"""A decoded sample's (role, modality, how) plan, shared by every sample of a spec; not collated."""


@dataclass(frozen=True)
class DecodeSpec:
    """How raw records become tensors, and which roles a sample must have to be kept."""

    image_size: int = 64
    image_channels: int = 3
    audio_mels: int = 64
    audio_frames: int = 64
    video_frames: int = 8
    video_size: int = 32
    required: tuple[str, ...] = ("image", "text")
    optional: tuple[str, ...] = ()
    max_pixels: int = MAX_IMAGE_PIXELS
    seed: int = 0
    image_fit: str = "resize"
    """resize (stretch to a square) | center_crop (short side to size, centre cut) | random_crop
    (short side to 9/8 × size, a random cut per epoch in training, the centre in evaluation)."""
    roles: tuple[tuple[str, str], ...] = ()
    """Extra roles as (role, modality name) pairs (``data.roles``)."""
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    """Plug-in modalities' options by modality name (``data.options``)."""

    def plan(self) -> tuple[tuple[str, Any, str], ...]:
        """(role, modality, "required" | "optional" | "always") for every decoded role, in order."""
        cached = self.__dict__.get("_plan")
        if cached is None:
            roles = dict(self.roles)
            entries = [(r, "required") for r in self.required]
            entries += [(r, "optional") for r in self.optional if r not in self.required]
            entries += [
                (r, "always") for r in always_decoded_roles() if r not in self.required + self.optional
            ]
            cached = tuple((role, modality_of(role, roles), how) for role, how in entries)
            object.__setattr__(self, "_plan", cached)
        return cached

    def __getstate__(self) -> dict[str, Any]:
        # Workers rebuild the plan (modalities are found by name in their own registry).
        return {k: v for k, v in self.__dict__.items() if k != "_plan"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def decode_sample(raw: dict[str, Any], spec: DecodeSpec, train: bool) -> dict[str, Any]:
    """Raw tar record → decoded sample; raises ValueError (a counted skip) when a required role is
    missing or a member cannot be decoded."""
    key = raw["__key__"]
    plan = spec.plan()
    out: dict[str, Any] = {"__key__": key, "__shard__": raw.get("__shard__"), ROLES_FIELD: plan}
    ctx = SampleContext(key, raw.get("__epoch__", 0), spec.seed, train, raw)
    for role, modality, how in plan:
        found = modality.member(raw, role)
        fields = modality.decode(found, role, spec, ctx) if found is not None else None
        present = fields is not None and modality.is_present(fields)
        if not present:
            if how == "required":
                raise ValueError(modality.missing_message(key, role) + _dotted_hint(raw, key, modality))
            fields = modality.absent(role, spec)
        if how == "optional":
            out[f"{role}_present"] = present
        out.update(fields)
    return out


def _dotted_hint(raw: dict[str, Any], key: str, modality: Any) -> str:
    """Why a sample may lack its member: keys with dots (only built on this failure path)."""
    dotted = sorted(
        ext
        for ext in raw
        if not ext.startswith("__") and ext.rpartition(".")[2] in modality.extensions and "." in ext
    )
    if not dotted or not any(c.isdigit() for c in dotted[0]):
        return ""
    return (
        f" (it holds {', '.join(dotted[:3])}{' ...' if len(dotted) > 3 else ''}: keys with dots? as in "
        f"webdataset the key ends at the first dot of the file name, so {key}.{dotted[0]} is key "
        f"{key!r}, member {dotted[0]!r}; write keys without dots)"
    )


class BatchCollate:
    """Rows → batch (tokenising the target captions). A plain object so spawned workers can pickle it."""

    def __init__(self, tokenizer: Tokenizer, max_text_len: int):
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        first = rows[0]
        batch: dict[str, Any] = {
            "valid": torch.tensor([r.get("valid", True) for r in rows], dtype=torch.bool),  # [B]
            "__key__": [r["__key__"] for r in rows],
            "__shard__": [r.get("__shard__") for r in rows],  # where a sample came from (diagnosis)
        }
        for role, modality, how in first[ROLES_FIELD]:
            batch.update(modality.collate(rows, role, self))
            if how == "optional":
                batch[f"{role}_present"] = torch.tensor(
                    [r[f"{role}_present"] for r in rows], dtype=torch.bool
                )
        return batch


def to_model_units(batch: dict[str, Any], roles: dict[str, str] | None = None) -> dict[str, Any]:
    """Each role's entries in model units, in place (images uint8 → float in [-1, 1]); called once
    the batch is on the task's device, so loader workers only ever move compact dtypes."""
    from xmodal.registry import MODALITIES

    for role in list(batch):
        name = (roles or {}).get(role, role)
        if name in MODALITIES:
            MODALITIES.get(name)().to_model_units(batch, role)
    return batch
