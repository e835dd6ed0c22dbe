"""xmodal-generate CKPT …: outputs of a trained model, from the checkpoint alone.

Captioners print a caption per input:

    xmodal-generate best.ckpt --image a.png b.png        # image → text
    xmodal-generate best.ckpt --audio clip.wav           # audio → text

Image generators (GAN, VAE) write PNGs (one per sample, plus ``grid.png``) into ``--out``, and
print their paths; the condition depends on the model:

    xmodal-generate gan.ckpt --num 16                            # unconditional
    xmodal-generate gan.ckpt --caption "a large red circle" --num 8   # text → image
    xmodal-generate vae.ckpt --label 3 7 --num 4                 # class → image
    xmodal-generate vae.ckpt --audio clip.wav --num 4            # audio → image
    xmodal-generate t2a.ckpt --caption "a small blue square" --num 4   # text → audio

A VAE whose target is audio writes its log-mel samples as spectrogram PNGs (mel bands up, low
ones at the bottom; time across), on the model's fixed scale, so brightness compares between files.

Samples are seeded (``--seed``): the same command writes the same images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from xmodal.console import print_error
from xmodal.data.audio import decode_audio
from xmodal.data.datamodule import decode_image
from xmodal.images import caption_grid, image_grid, to_pixels


class UsageError(ValueError):
    """Bad arguments for this checkpoint: printed without a traceback, exit code 2."""


def read_audio(paths: list[Path], data: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mels ``[N, 1, M, T]`` and frame masks ``[N, T]`` of audio files."""
    mels, masks = [], []
    for path in paths:
        try:
            mel, mask = decode_audio(
                path.read_bytes(), path.suffix.lstrip(".").lower(), data["audio_mels"], data["audio_frames"]
            )
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot read {path}: {err}") from err
        mels.append(mel)  # [1, M, T]
        masks.append(mask)  # [T] True on real frames
    return torch.stack(mels), torch.stack(masks)


def read_images(paths: list[Path], data: dict[str, int]) -> torch.Tensor:
    """Images ``[N, C, H, W]`` in [-1, 1], resized as in training."""
    images = []
    for path in paths:
        try:
            pixels = decode_image(path.read_bytes(), data["image_size"], channels=data["image_channels"])
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot read {path}: {err}") from err
        images.append(pixels.float() / 127.5 - 1.0)  # [C, H, W]
    return torch.stack(images)


def captions_for(task: Any, args: argparse.Namespace) -> list[tuple[str, str]]:
    """(input, caption) for every --image or --audio file."""
    files = args.image or args.audio
    if not files:
        raise UsageError(f"{args.ckpt} is a captioner: give --{task.source} FILE …")
    wanted = "audio" if args.audio else "image"
    if task.source != wanted:
        raise UsageError(f"{args.ckpt} captions {task.source}, not {wanted}: use --{task.source}")
    data = task.hparams.data
    if args.audio:
        mels, masks = read_audio(files, data)
        captions = task.caption(mels, masks)
    else:
        captions = task.caption(read_images(files, data))
    return [(str(path), caption) for path, caption in zip(files, captions, strict=True)]


def condition_batch(task: Any, args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """A batch holding each requested condition ``--num`` times, and a name per row."""
    kind, n = task.hparams.model["condition"], args.num
    given = {"text": args.caption, "label": args.label, "audio": args.audio}
    extra = [f"--{'caption' if k == 'text' else k}" for k, v in given.items() if v and k != kind]
    if extra or args.image:
        raise UsageError(
            f"{args.ckpt} is conditioned on {kind!r}: {' '.join(extra or ['--image'])} does not apply"
        )
    if kind == "none":
        return {"valid": torch.ones(n, dtype=torch.bool)}, [""] * n
    if not given[kind]:
        flag = {"text": "--caption TEXT", "label": "--label N", "audio": "--audio FILE"}[kind]
        raise UsageError(f"{args.ckpt} is conditioned on {kind}: give {flag} …")
    batch: dict[str, Any] = {}
    if kind == "text":
        names = [c for c in args.caption for _ in range(n)]
        batch["text"], batch["text_mask"] = task.tokenizer.encode_batch(
            names, task.hparams.data["max_text_len"]
        )
    elif kind == "label":
        classes = task.hparams.model["num_classes"]
        bad = [label for label in args.label if not 0 <= label < classes]
        if bad:
            raise UsageError(f"--label {bad}: this model knows classes 0..{classes - 1}")
        names = [str(label) for label in args.label for _ in range(n)]
        batch["label"] = torch.tensor([label for label in args.label for _ in range(n)])
    else:
        mels, masks = read_audio(args.audio, task.hparams.data)
        names = [str(path) for path in args.audio for _ in range(n)]
        batch["audio"], batch["audio_mask"] = mels.repeat_interleave(n, 0), masks.repeat_interleave(n, 0)
    batch["valid"] = torch.ones(len(names), dtype=torch.bool)
    return batch, names


@torch.no_grad()
def sample_images(task: Any, batch: dict[str, Any], seed: int) -> torch.Tensor:
    """Images ``[N, C, H, W]`` in [-1, 1] for the rows of ``batch``, seeded (an audio VAE's
    log-mels as spectrogram images ``[N, 1, M, T]``)."""
    rows = int(batch["valid"].shape[0])
    batch = {k: v.to(task.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    if task.hparams.model["task"] == "gan":
        generator = torch.Generator().manual_seed(seed)
        z = torch.randn(rows, task.hparams.model["gan"]["z_dim"], generator=generator)  # [N, Z]
        return task.generate(batch, z).float()
    return task.as_images(task.sample(rows, task.conditioning(batch), seed=seed)).float()


def write_images(images: torch.Tensor, names: list[str], out: Path) -> list[Path]:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="xmodal-generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ckpt", type=Path, help="a .ckpt file written by xmodal-train")
    parser.add_argument("--image", type=Path, nargs="+", help="image file(s) to caption")
    parser.add_argument("--audio", type=Path, nargs="+", help="audio file(s): to caption, or as conditions")
    parser.add_argument("--caption", nargs="+", help="text condition(s) of a text → image/audio model")
    parser.add_argument("--label", type=int, nargs="+", help="class condition(s) of a label → image model")
    parser.add_argument("--num", type=int, default=4, help="images per condition (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("generated"), help="folder for generated images")
    parser.add_argument("--json", action="store_true", help="print one JSON object per line")
    args = parser.parse_args(argv)
    if not args.ckpt.is_file():
        print_error(f"checkpoint not found: {args.ckpt}")
        return 2
    missing = [str(p) for p in (args.image or []) + (args.audio or []) if not p.is_file()]
    if missing:
        print_error(f"{'image' if args.image else 'audio'} not found: {', '.join(missing)}")
        return 2
    if args.num < 1:
        print_error("--num must be >= 1")
        return 2
    from xmodal.evaluate import load_task

    task = load_task(args.ckpt).eval()
    try:
        if task.hparams.model["task"] == "caption":
            key = "audio" if args.audio else "image"
            for source, caption in captions_for(task, args):
                print(json.dumps({key: source, "caption": caption}) if args.json else f"{source}: {caption}")
            return 0
        batch, names = condition_batch(task, args)
        paths = write_images(sample_images(task, batch, args.seed), names, args.out)
    except UsageError as err:
        print_error(str(err))
        return 2
    for path, name in zip(paths, names, strict=True):
        print(
            json.dumps({"image": str(path), "condition": name}) if args.json else f"{path}  {name}".rstrip()
        )
    print(f"grid: {args.out / 'grid.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
