"""Listenable text → audio (issue 17): do clips decoded for a caption carry the tones it asks for?

    python benchmarks/text2audio.py [--steps 1000] [--threads 1] [--out DIR] [overrides...]
    python benchmarks/text2audio.py --ckpt outputs/shapes_text2audio_vae/<id>/checkpoints/best.ckpt

Trains ``experiment=shapes_text2audio_vae`` for ``--steps`` (its shipped 1000 by default), or takes
a trained ``--ckpt`` and tests it (``xmodal-eval``'s code), then prints the test tone accuracy of
clips decoded per test caption (vocoded by Griffin-Lim, re-analysed by a plain FFT:
``xmodal/metrics/tones.py``), of the real test clips through the same vocoder and analysis (the
bound the vocoder allows), of the checkpoint's reconstructions (z from the encoder: do decoder
and vocoder keep tones that z carries?) and of chance (one in 4 kinds, 6 colours, 9 positions). Extra arguments
are Hydra overrides.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ATTRIBUTES = {"kind": 4, "colour": 6, "position": 9}  # candidates per attribute (chance = 1 / n)


def train_run(overrides: list[str]) -> tuple[dict[str, float], float, Path]:
    """Fit and test one run; its test metrics (metrics.json), the wall time of the whole run and
    the checkpoint it tested."""
    from xmodal.config import compose_config
    from xmodal.train import train

    cfg = compose_config([*overrides, "run.id=bench"])
    start = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - start
    run_dir = Path(cfg.paths.output_dir) / cfg.experiment_name / "bench"
    summary = json.loads((run_dir / "metrics.json").read_text())
    return summary["test"], wall, Path(summary["best_checkpoint"])


def test_checkpoint(ckpt: Path, overrides: list[str]) -> tuple[dict[str, float], float]:
    """The test metrics of a trained checkpoint (``xmodal-eval ckpt_path=…``) and their wall time."""
    from xmodal.config import compose_config
    from xmodal.evaluate import evaluate

    cfg = compose_config([*overrides, f"ckpt_path={ckpt.resolve()}"], config_name="eval")
    start = time.perf_counter()
    metrics = evaluate(cfg)
    return metrics, time.perf_counter() - start


@torch.no_grad()
def reconstruction_tones(ckpt: Path, overrides: list[str], batches: int) -> dict[str, float]:
    """Tone accuracy of the checkpoint's reconstructions (z = the encoder's posterior mean of the
    real clip, decoded with its caption) on the first ``batches`` test batches: whether decoder,
    vocoder and detector keep the tones when z carries them."""
    from xmodal.config import compose_config
    from xmodal.evaluate import load_task
    from xmodal.factory import build_datamodule, prepare_data
    from xmodal.metrics.tones import ToneAccuracy
    from xmodal.tasks.base import condition_names

    task = load_task(ckpt).eval()
    cfg = compose_config(overrides)
    datamodule = build_datamodule(cfg, prepare_data(cfg), tokenizer=task.tokenizer)
    datamodule.setup("test")
    tones = ToneAccuracy()
    for i, batch in enumerate(datamodule.test_dataloader()):
        if i == batches:
            break
        real, mask = task.target_data(batch)  # [B, 1, M, T], [B, 1, 1, T]
        cond = task.conditioning(batch)
        recon = task.display(task.decoder(task.encode(real, cond)[0], cond)[0])
        valid = batch["valid"]
        keep = valid.tolist()
        captions = [c for c, v in zip(condition_names(batch, task.cfg.condition), keep, strict=True) if v]
        tones.update(torch.where(mask, recon, real)[valid], mask[valid, 0, 0], captions)
    return {f"test/tone_recon_{name}_acc": float(tones.means[name].compute()) for name in tones.named()}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the experiment's)")
    parser.add_argument("--ckpt", type=Path, default=None, help="test this checkpoint instead of training")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared box)")
    parser.add_argument(
        "--out", type=Path, default=None, help="keep runs and data here (default: a temp dir)"
    )
    parser.add_argument(
        "--recon-batches", type=int, default=2, help="test batches for the reconstruction row"
    )
    args, extra = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    root = args.out or Path(tempfile.mkdtemp(prefix="text2audio-"))
    overrides = [
        "experiment=shapes_text2audio_vae",
        "trainer.enable_progress_bar=false",
        f"paths.output_dir={root / 'outputs'}",
        f"paths.data_dir={root / 'data'}",
        *([] if args.steps is None else [f"trainer.max_steps={args.steps}"]),
        *extra,
    ]
    if args.ckpt is None:
        test, wall, ckpt = train_run([*overrides, "logger=csv"])
        what = f"train + test ({args.steps or 'the experiment default'} steps)"
    else:
        (test, wall), ckpt = test_checkpoint(args.ckpt, overrides), args.ckpt
        what = f"test of {args.ckpt}"
    test |= reconstruction_tones(ckpt, overrides, args.recon_batches)
    print(f"\nmachine: {platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); {what}")
    print(f"wall {wall:.0f} s; test nll {test.get('test/nll', float('nan')):.1f} nats; runs in {root}")
    print("| test clips | " + " | ".join(f"{a} acc" for a in ATTRIBUTES) + " |")
    print("|" + "---|" * (1 + len(ATTRIBUTES)))
    rows = (
        ("decoded per caption (z from the prior)", "test/tone"),
        (f"reconstructed (z from the encoder; {args.recon_batches} batches)", "test/tone_recon"),
        ("real, through the vocoder", "test/tone_real"),
    )
    for label, prefix in rows:
        cells = [
            f"{test[f'{prefix}_{a}_acc']:.3f}" if f"{prefix}_{a}_acc" in test else "—" for a in ATTRIBUTES
        ]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("| chance | " + " | ".join(f"{1 / n:.3f}" for n in ATTRIBUTES.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
