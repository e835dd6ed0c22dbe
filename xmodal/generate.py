"""xmodal-generate CKPT …: outputs of a trained model, from the checkpoint alone.

Captioners print a caption per input:

    xmodal-generate best.ckpt --image a.png b.png        # image → text
    xmodal-generate best.ckpt --audio clip.wav           # audio → text

Generators (GAN, VAE) write PNGs (one per sample, plus ``grid.png``) into ``--out``, and print
their paths; the condition depends on the model:

    xmodal-generate gan.ckpt --num 16                            # unconditional
    xmodal-generate gan.ckpt --caption "a large red circle" --num 8   # text → image
    xmodal-generate vae.ckpt --label 3 7 --num 4                 # class → image
    xmodal-generate vae.ckpt --audio clip.wav --num 4            # audio → image
    xmodal-generate t2a.ckpt --caption "a small blue square" --num 4   # text → audio

A VAE whose target is audio writes its log-mel samples as spectrogram PNGs (mel bands up, low
ones at the bottom; time across), on the model's fixed scale, so brightness compares between files.
It also writes each as a 16 kHz WAV beside the PNG (``sample_0000.wav``: Griffin-Lim, see
xmodal/codecs/vocoder.py), the model's every frame long.

A file input may also be a folder (every file of that modality in it, recursively, sorted) or a
quoted glob (``--image 'photos/*.jpg'``); ``--json`` or ``--csv`` print machine-readable rows:

    xmodal-generate best.ckpt --image photos/ --csv > captions.csv

From Python, ``xmodal.load(CKPT).caption(files)`` / ``.generate(caption=[...])`` run the same code.

Samples are seeded (``--seed``): the same command writes the same images. One input flag per
registered modality (a plug-in modality adds ``--<name>``); what a checkpoint does with them is its
task's ``generate_outputs``.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import sys
from pathlib import Path
from typing import Any

from xmodal.console import print_error
from xmodal.registry import MODALITIES


def input_flags() -> dict[str, tuple[str, bool]]:
    """Modality name → (its flag, whether it takes files), for every registered modality; from
    registry hints where given, so ``--help`` imports no modality (and no torch)."""
    return {
        name: (MODALITIES.attr(name, "input_flag") or name, MODALITIES.attr(name, "input_files"))
        for name in MODALITIES.names()
    }


def build_parser(modalities: dict[str, tuple[str, bool]]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xmodal-generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ckpt", type=Path, help="a .ckpt file written by xmodal-train")
    for name, (flag, files) in modalities.items():
        what = "file(s), folder(s) or glob(s)" if files else "value(s)"
        parser.add_argument(
            f"--{flag}",
            dest=f"in_{name}",
            nargs="+",
            metavar="FILE" if files else flag.upper(),
            help=f"{name} input {what}: to caption, or as conditions",
        )
    parser.add_argument("--num", type=int, default=4, help="samples per condition (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("generated"), help="folder for generated files")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON object per line")
    output.add_argument("--csv", action="store_true", help="print a CSV table (header first)")
    return parser


def expand_files(values: list[str], modality: Any) -> list[str]:
    """Folders become their files of the modality (recursive, sorted); globs their sorted matches.
    Raises ValueError naming a folder or pattern that yields nothing."""
    out: list[str] = []
    for value in values:
        path = Path(value)
        if path.is_dir():
            found = sorted(
                str(p) for p in path.rglob("*") if p.suffix.lstrip(".").lower() in modality.extensions
            )
        elif glob.has_magic(value) and not path.exists():
            found = sorted(glob.glob(value, recursive=True))
        else:
            out.append(value)
            continue
        if not found:
            raise ValueError(f"{value}: no {modality.name} files ({', '.join(modality.extensions)}) in it")
        out += found
    return out


def print_rows(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    if args.csv:
        columns = list(dict.fromkeys(key for row in rows for key in row))
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return
    for row in rows:
        print(
            json.dumps(row, ensure_ascii=False)
            if args.json
            else "  ".join(str(v) for v in row.values() if v != "")
        )


def main(argv: list[str] | None = None) -> int:
    from xmodal.registry import RegistryError

    try:
        modalities = input_flags()  # imports plug-ins: a broken one is named in one line
    except RegistryError as err:
        print_error(str(err))
        return 2
    args = build_parser(modalities).parse_args(argv)
    inputs: dict[str, list[Any]] = {
        name: getattr(args, f"in_{name}") for name in modalities if getattr(args, f"in_{name}")
    }
    if not args.ckpt.is_file():
        print_error(f"checkpoint not found: {args.ckpt}")
        return 2
    try:
        inputs = {
            name: expand_files(values, MODALITIES.get(name)) if modalities[name][1] else values
            for name, values in inputs.items()
        }
    except ValueError as err:
        print_error(str(err))
        return 2
    for name, values in inputs.items():
        missing = [str(v) for v in values if modalities[name][1] and not Path(v).is_file()]
        if missing:
            print_error(f"{name} not found: {', '.join(missing)}")
            return 2
    if args.num < 1:
        print_error("--num must be >= 1")
        return 2
    from xmodal.evaluate import load_task
    from xmodal.tasks.base import GenerateError

    try:
        task = load_task(args.ckpt).eval()
        rows = task.generate_outputs(inputs, args)
    except (GenerateError, RegistryError) as err:
        print_error(str(err))
        return 2
    print_rows(rows, args)
    wrote = any(str(v).startswith(str(args.out)) for row in rows for v in row.values())
    if wrote and not args.csv and (args.out / "grid.png").is_file():
        print(f"grid: {args.out / 'grid.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
