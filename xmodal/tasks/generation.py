"""What ``generate_outputs`` implementations share: inputs → batches, and sample files.

``inputs`` maps a modality name to the values given on the command line (``--image`` files,
``--caption`` texts, ``--label`` ids; a plug-in modality gets ``--<name>``), as built by
xmodal/generate.py from the modality registry.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from xmodal.data.batch import BatchCollate, DecodeSpec
from xmodal.images import caption_grid, image_grid, to_pixels
from xmodal.modalities.base import Modality
from xmodal.modalities.roles import modality_of
from xmodal.tasks.base import GenerateError, to_device
from xmodal.tasks.config import condition_names_of


def flag_of(modality: Modality) -> str:
    return f"--{modality.input_flag or modality.name}"


def decode_spec_of(data: dict[str, Any]) -> DecodeSpec:
    """The decoding of a checkpoint's data shape (how its inputs were prepared in training)."""
    return DecodeSpec(
        image_size=data["image_size"],
        image_channels=data["image_channels"],
        audio_mels=data["audio_mels"],
        audio_frames=data["audio_frames"],
        # Checkpoints from before the video modality have no video keys.
        video_frames=data.get("video_frames", 8),
        video_size=data.get("video_size", 32),
        roles=tuple(sorted(data.get("roles", {}).items())),
        options=data.get("options", {}),
    )


def role_inputs(task: Any, role: str, values: list[Any], repeat: int = 1) -> dict[str, Any]:
    """A batch holding ``role`` for each input value (each ``repeat`` times), in model units."""
    data = task.hparams.data
    modality = modality_of(role, data.get("roles"))
    collate = BatchCollate(task.tokenizer, data["max_text_len"])
    try:
        batch = modality.read_inputs(values, role, decode_spec_of(data), collate)
    except (OSError, ValueError) as err:
        raise GenerateError(f"cannot read {flag_of(modality)} input: {err}") from err
    if repeat > 1:
        batch = {
            k: v.repeat_interleave(repeat, 0) if torch.is_tensor(v) else [x for x in v for _ in range(repeat)]
            for k, v in batch.items()
        }
    return batch


def only_inputs(
    ckpt: Any, inputs: dict[str, list[Any]], wanted: str | tuple[str, ...] | None, what: str
) -> None:
    """Refuse inputs of any modality but ``wanted`` (one name or several; None: no inputs at all)."""
    from xmodal.registry import MODALITIES

    allowed = (wanted,) if isinstance(wanted, str) else wanted or ()
    extra = [
        flag_of(MODALITIES.get(name)()) for name, values in inputs.items() if values and name not in allowed
    ]
    if extra:
        raise GenerateError(f"{ckpt} is {what}: {' '.join(extra)} does not apply")


def write_images(images: torch.Tensor, names: list[str], out: Path) -> list[Path]:
    """One PNG per image ``[N, C, H, W]`` in [-1, 1] plus ``grid.png`` (captioned when named)."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pixels in enumerate(to_pixels(images)):
        path = out / f"sample_{i:04d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    grid = caption_grid(images, names) if any(names) else image_grid(images, scale=2)
    grid.save(out / "grid.png")
    return paths


def check_labels(batch: dict[str, Any], cfg: Any) -> None:
    """Refuse requested class ids the model does not know (before its embedding would)."""
    labels = batch.get("label")
    if "label" in condition_names_of(cfg.condition) and labels is not None:
        bad = sorted({int(y) for y in labels if not 0 <= int(y) < cfg.num_classes})
        if bad:
            raise GenerateError(f"--label {bad}: this model knows classes 0..{cfg.num_classes - 1}")


@torch.no_grad()
def write_conditional_samples(
    task: Any,
    cfg: Any,
    inputs: dict[str, list[Any]],
    args: Any,
    sample: Callable[[dict[str, Any], int], torch.Tensor],
    show: Callable[[torch.Tensor], torch.Tensor] | None = None,
    target: Modality | None = None,
) -> list[dict[str, str]]:
    """A generator's ``generate_outputs``: the batch of requested conditions (``cfg.condition``,
    ``args.num`` rows each) on the task's device, ``sample(batch, rows)`` → images ``[N, C, H, W]``
    in [-1, 1] (or values that ``show`` makes images), written as PNGs + ``grid.png`` in
    ``args.out``, plus the ``target`` modality's own files of the values (``sample_0000.wav``);
    one row per sample."""
    batch, names = conditional_batch(task, cfg.condition, inputs, args)
    check_labels(batch, cfg)
    values = sample(to_device(batch, task.device), len(names)).float().cpu()
    paths = write_images(values if show is None else show(values), names, args.out)
    rows = [{"image": str(path)} for path in paths]
    for i, (ext, data) in enumerate([] if target is None else target.output_files(values)):
        path = args.out / f"sample_{i:04d}.{ext}"
        path.write_bytes(data)
        rows[i][target.name] = str(path)
    return [{**row, "condition": name} for row, name in zip(rows, names, strict=True)]


def conditional_batch(
    task: Any, condition: str | list[str], inputs: dict[str, list[Any]], args: Any
) -> tuple[dict[str, Any], list[str]]:
    """A batch holding each requested condition ``args.num`` times, and a name per row, for a
    generator conditioned on role ``condition`` (``none``: unconditional; a list of roles: one
    input of each per row, e.g. ``--caption A --audio a.wav``)."""
    n = args.num
    roles = condition_names_of(condition)
    if not roles:
        only_inputs(args.ckpt, inputs, None, "unconditional")
        return {"valid": torch.ones(n, dtype=torch.bool), "__key__": [""] * n}, [""] * n
    shown = condition if isinstance(condition, str) else list(roles)
    modalities = [modality_of(role, task.hparams.data.get("roles")) for role in roles]
    only_inputs(args.ckpt, inputs, tuple(m.name for m in modalities), f"conditioned on {shown!r}")
    batch: dict[str, Any] = {}
    names: list[str] = []
    for role, modality in zip(roles, modalities, strict=True):
        values = inputs.get(modality.name)
        if not values:
            kind = (
                "TEXT"
                if modality.input_flag == "caption"
                else "N"
                if modality.input_flag == "label"
                else "FILE"
            )
            raise GenerateError(f"{args.ckpt} is conditioned on {role}: give {flag_of(modality)} {kind} …")
        if names and len(values) * n != len(names):
            raise GenerateError(
                f"{args.ckpt} is conditioned on {shown}: give as many {flag_of(modality)} as "
                f"{flag_of(modalities[0])} inputs (one of each per sample row)"
            )
        batch.update(role_inputs(task, role, values, repeat=n))
        row = [str(v) for v in values for _ in range(n)]
        names = [f"{a} + {b}" for a, b in zip(names, row, strict=True)] if names else row
    batch["valid"] = torch.ones(len(names), dtype=torch.bool)
    batch["__key__"] = names
    return batch, names
