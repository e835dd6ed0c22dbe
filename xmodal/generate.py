"""xmodal-generate CKPT --image FILE [FILE ...] | --audio FILE [...]: captions from a checkpoint, printed (or JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from xmodal.console import print_error
from xmodal.data.audio import decode_audio
from xmodal.data.datamodule import decode_image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xmodal-generate", description=__doc__)
    parser.add_argument("ckpt", type=Path, help="a .ckpt file written by xmodal-train")
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--image", type=Path, nargs="+", help="image file(s) to caption")
    inputs.add_argument("--audio", type=Path, nargs="+", help="audio file(s) (.wav/.flac) to caption")
    parser.add_argument("--json", action="store_true", help="print one JSON object per line")
    args = parser.parse_args(argv)
    if not args.ckpt.is_file():
        print_error(f"checkpoint not found: {args.ckpt}")
        return 2
    files = args.image or args.audio
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        print_error(f"{'image' if args.image else 'audio'} not found: {', '.join(missing)}")
        return 2
    from xmodal.evaluate import load_task

    task = load_task(args.ckpt).eval()
    if not hasattr(task, "caption"):
        print_error(f"{args.ckpt} holds a {task.hparams.model['task']} model, not a captioner")
        return 2
    wanted = "audio" if args.audio else "image"
    if task.source != wanted:
        print_error(f"{args.ckpt} captions {task.source}, not {wanted}: use --{task.source}")
        return 2
    data = task.hparams.data
    tensors, masks = [], []
    for path in files:
        try:
            if args.audio:
                mels, mask = decode_audio(
                    path.read_bytes(),
                    path.suffix.lstrip(".").lower(),
                    data["audio_mels"],
                    data["audio_frames"],
                )
                tensors.append(mels)  # [1, M, T]
                masks.append(mask)  # [T] True on real frames (padding is hidden from the decoder)
            else:
                pixels = decode_image(path.read_bytes(), data["image_size"], channels=data["image_channels"])
                tensors.append(pixels.float() / 127.5 - 1.0)  # [C, H, W] in [-1, 1]
        except (OSError, ValueError) as err:
            print_error(f"cannot read {path}: {err}")
            return 2
    source = torch.stack(tensors)
    captions = task.caption(source, torch.stack(masks)) if masks else task.caption(source)
    for path, caption in zip(files, captions, strict=True):
        print(json.dumps({wanted: str(path), "caption": caption}) if args.json else f"{path}: {caption}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
