"""Text: captions from the sample's JSON ``captions`` list or its ``.txt`` → token ids at collate."""

from __future__ import annotations

from typing import Any

from xmodal.codecs.json_meta import load_json_member
from xmodal.modalities.base import Modality, SampleContext, json_member_name
from xmodal.modalities.image import sample_hash


def sample_captions(sample: dict[str, Any], meta: dict[str, Any] | None = None) -> list[str]:
    """All captions of a raw sample: the ``captions`` list of its JSON (``meta``: already parsed),
    else its ``.txt``. ValueError naming the member for an invalid or too deeply nested JSON."""
    if meta is None and "json" in sample:
        meta = load_json_member(sample["json"], json_member_name(sample))
        if not isinstance(meta, dict):
            raise ValueError(f"{json_member_name(sample)}: must be a JSON object, not {type(meta).__name__}")
    if meta and meta.get("captions"):
        return [str(c) for c in meta["captions"]]
    if "txt" in sample:
        return [sample["txt"].decode("utf-8").strip()]
    return []


class TextModality(Modality):
    """Batch: ``text`` long ``[B, T]`` + ``text_mask`` bool ``[B, T]`` (the row's target caption),
    and ``captions`` (every reference of each row, a list)."""

    name = "text"
    extensions = ("txt", "json")
    decoded_always = True
    input_flag = "caption"
    input_files = False

    def member(self, raw: dict[str, Any], role: str) -> tuple[str, Any] | None:
        # Captions live in the JSON's list (several references) or in the .txt; parsed in decode.
        return ("captions", None) if ("json" in raw or "txt" in raw) else None

    def decode(self, found: tuple[str, Any], role: str, spec: Any, ctx: SampleContext) -> dict[str, Any]:
        captions = sample_captions(ctx.raw, ctx.meta)
        if not captions:
            return self.absent(role, spec)
        if ctx.train and len(captions) > 1:
            # Training draws one caption per epoch, seeded by (seed, epoch, key): a resumed run sees
            # the same captions. A hash, not a seeded Random: 0.2 µs instead of 5 µs per sample.
            caption = captions[sample_hash("caption", ctx.seed, ctx.epoch, ctx.key) % len(captions)]
        else:
            caption = captions[0]  # evaluation: the first is the target, all are references
        return {"captions": captions, "caption": caption}

    def is_present(self, fields: dict[str, Any]) -> bool:
        return bool(fields["captions"])

    def absent(self, role: str, spec: Any) -> dict[str, Any]:
        return {"captions": [], "caption": ""}

    def missing_message(self, key: str, role: str) -> str:
        return f"sample {key!r} has no caption"

    def collate(self, rows: list[dict[str, Any]], role: str, collate: Any) -> dict[str, Any]:
        ids, mask = collate.tokenizer.encode_batch([r["caption"] for r in rows], collate.max_text_len)
        return {role: ids, f"{role}_mask": mask, "captions": [r["captions"] for r in rows]}  # [B, T] ×2

    def read_inputs(self, values: list[Any], role: str, spec: Any, collate: Any) -> dict[str, Any]:
        rows = [{"caption": str(v), "captions": [str(v)]} for v in values]
        return self.collate(rows, role, collate)
