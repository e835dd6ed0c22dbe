"""xmodal-generate CKPT --image FILE [FILE ...]: captions from a checkpoint, printed (or as JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from xmodal.console import print_error
from xmodal.data.datamodule import decode_image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xmodal-generate", description=__doc__)
    parser.add_argument("ckpt", type=Path, help="a .ckpt file written by xmodal-train")
    parser.add_argument("--image", type=Path, nargs="+", required=True, help="image file(s) to caption")
    parser.add_argument("--json", action="store_true", help="print one JSON object per line")
    args = parser.parse_args(argv)
    if not args.ckpt.is_file():
        print_error(f"checkpoint not found: {args.ckpt}")
        return 2
    missing = [str(p) for p in args.image if not p.is_file()]
    if missing:
        print_error(f"image not found: {', '.join(missing)}")
        return 2
    from xmodal.evaluate import load_task

    task = load_task(args.ckpt).eval()
    size = task.hparams.image_size
    images = []
    for path in args.image:
        try:
            images.append(decode_image(path.read_bytes(), size))
        except OSError as err:
            print_error(f"cannot read image {path}: {err}")
            return 2
    source = torch.stack(images).float() / 127.5 - 1.0  # [B, 3, H, W] in [-1, 1]
    for path, caption in zip(args.image, task.caption(source), strict=True):
        print(json.dumps({"image": str(path), "caption": caption}) if args.json else f"{path}: {caption}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
