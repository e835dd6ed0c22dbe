"""Class labels: a ``.cls`` member or ``label`` in the sample's JSON → long ``[B]`` (-1 = none).

Another role of this modality (``data.roles: {colour: label}``) reads ``key.colour.cls`` or the
JSON's ``colour`` field: a second attribute to judge generated samples by (``judge_labels``)."""

from __future__ import annotations

from typing import Any

import torch

from xmodal.modalities.base import Modality, SampleContext


class LabelModality(Modality):
    name = "label"
    extensions = ("cls",)
    decoded_always = True
    input_flag = "label"
    input_files = False

    def member(self, raw: dict[str, Any], role: str) -> tuple[str, Any] | None:
        found = super().member(raw, role)
        if found is not None:
            return found
        return ("json", None) if "json" in raw else None

    def decode(self, found: tuple[str, Any], role: str, spec: Any, ctx: SampleContext) -> dict[str, Any]:
        if found[0] == "cls":
            try:
                return {role: int(found[1].decode("utf-8").strip())}
            except ValueError as err:
                raise ValueError(f"sample {ctx.key!r}: .cls is not an integer") from err
        label = ctx.meta.get(role)
        return {role: -1 if label is None else int(label)}

    def is_present(self, fields: dict[str, Any]) -> bool:
        return next(iter(fields.values())) != -1

    def absent(self, role: str, spec: Any) -> dict[str, Any]:
        return {role: -1}

    def missing_message(self, key: str, role: str) -> str:
        return f"sample {key!r} has no {role} (.cls member or '{role}' in its JSON)"

    def collate(self, rows: list[dict[str, Any]], role: str, collate: Any) -> dict[str, Any]:
        return {role: torch.tensor([r[role] for r in rows], dtype=torch.long)}  # [B]

    def read_inputs(self, values: list[Any], role: str, spec: Any, collate: Any) -> dict[str, Any]:
        try:
            return {role: torch.tensor([int(v) for v in values], dtype=torch.long)}
        except ValueError as err:
            raise ValueError(f"--{self.input_flag}: {err}") from err
