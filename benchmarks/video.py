"""Video (issue 17), side by side: the video captioner as shipped vs the same model seeing one frame,
and the text → video VAE.

    python benchmarks/video.py [--out DIR] [--steps N] [--only caption|baseline|vae|vae_film ...]

Each run is ``xmodal-train`` as a user starts it (``experiment=moving_shapes_video_caption``;
the baseline adds ``data.video_frames=1``, the middle frame; the VAE is
``experiment=moving_shapes_text2video_vae``, ``vae_film`` the same with ``model.fusion=film``),
timed as a whole process; a run whose directory already holds ``metrics.json`` is reused (its
time read back from ``wall_s.txt``). Then on the test split (256 clips):

- captioners: **motion-word accuracy**, the share of clips whose greedy caption names the right
  direction (left/right/up/down; chance 0.25), colour and kind accuracy likewise, and corpus
  BLEU-4 (xmodal.metrics.caption, the metric the run logs);
- VAE: test NLL (IWAE bound, bits/dim) from the run, and the **motion accuracy of its samples**:
  one clip drawn per test caption, the shape's centre found as the bright pixels of each frame,
  the direction of its largest displacement (first → last frame) compared with the caption's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from xmodal.data.moving_shapes import MOTIONS, motion_word
from xmodal.data.shapes import COLOURS, KINDS
from xmodal.evaluate import load_task
from xmodal.factory import build_datamodule, prepare_data
from xmodal.metrics.caption import caption_scores, metric_tokens

RUNS = {
    "caption": ("moving_shapes_video_caption", []),
    "baseline": ("moving_shapes_video_caption", ["data.video_frames=1"]),
    "vae": ("moving_shapes_text2video_vae", []),
    "vae_film": ("moving_shapes_text2video_vae", ["model.fusion=film"]),
}


def train(out: Path, name: str, steps: int | None) -> Path:
    """The run dir of ``name`` under ``out``, trained now unless it already finished."""
    experiment, extra = RUNS[name]
    run_dir = out / "outputs" / experiment / name
    if (run_dir / "metrics.json").is_file():
        return run_dir
    args = [f"experiment={experiment}", *extra, f"run.id={name}", "logger=csv"]
    args += [f"paths.data_dir={out / 'data'}", f"paths.output_dir={out / 'outputs'}"]
    args += [f"trainer.max_steps={steps}"] if steps else []
    start = time.perf_counter()
    subprocess.run(["xmodal-train", *args, "trainer.enable_progress_bar=false"], check=True, cwd=out)
    (run_dir / "wall_s.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    return run_dir


def test_batches(run_dir: Path, task: torch.nn.Module) -> list[dict]:
    """The test split of the run's own config (its data.video_frames included), in model units."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    datamodule = build_datamodule(cfg, prepare_data(cfg), task.tokenizer)
    datamodule.setup("test")
    return [datamodule.sample_batch(cfg.data.shapes.n_test, "test")]


def word_share(hypotheses: list[str], references: list[str], words: tuple[str, ...]) -> float:
    """Share of hypotheses naming the same first word of ``words`` as their reference."""

    def first(caption: str) -> str | None:
        return next((w for w in caption.split() if w in words), None)

    return sum(first(h) == first(r) for h, r in zip(hypotheses, references, strict=True)) / len(references)


def caption_row(run_dir: Path) -> dict[str, float]:
    task = load_task(run_dir / "checkpoints" / "best.ckpt").eval()
    hypotheses, references = [], []
    for batch in test_batches(run_dir, task):
        hypotheses += task.caption(batch["video"])
        references += batch["captions"]
    canonical = [refs[0] for refs in references]
    bleu = caption_scores(
        [metric_tokens(h) for h in hypotheses], [[metric_tokens(r) for r in refs] for refs in references]
    )
    return {
        "motion": word_share(hypotheses, canonical, tuple(MOTIONS)),
        "colour": word_share(hypotheses, canonical, tuple(COLOURS)),
        "kind": word_share(hypotheses, canonical, KINDS),
        "bleu4": bleu["bleu4"],
        "clips": len(hypotheses),
    }


def sample_motion(clips: torch.Tensor) -> list[str]:
    """Direction of each clip's shape, first → last frame; clips ``[B, C, T, H, W]`` in [-1, 1].

    The shape's centre is the centre of mass of each frame's brightness above that frame's median
    (the background): samples are blurred means, so a fixed threshold would find no shape at all."""
    value = clips.amax(1)  # [B, T, H, W]
    weight = (value - value.flatten(2).median(2).values[..., None, None]).clamp(min=0)
    ys, xs = torch.meshgrid(torch.arange(clips.shape[3]), torch.arange(clips.shape[4]), indexing="ij")
    total = weight.sum((2, 3)).clamp(min=1e-6)  # [B, T]
    centre = torch.stack([(weight * xs).sum((2, 3)), (weight * ys).sum((2, 3))], -1) / total[..., None]
    moves = centre[:, -1] - centre[:, 0]  # [B, 2] x, y
    return [
        ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
        for dx, dy in moves.tolist()
    ]


def vae_row(run_dir: Path) -> dict[str, float]:
    task = load_task(run_dir / "checkpoints" / "best.ckpt").eval()
    test = json.loads((run_dir / "metrics.json").read_text())["test"]
    named, wanted = [], []
    for batch in test_batches(run_dir, task):
        named += sample_motion(task.sample(len(batch["captions"]), task.conditioning(batch), seed=1))
        wanted += [motion_word(refs[0]) for refs in batch["captions"]]
    hits = sum(n == w for n, w in zip(named, wanted, strict=True))
    return {"nll_bpd": test["test/nll_bpd"], "sample_motion": hits / len(wanted), "clips": len(wanted)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-video"))
    parser.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default: as shipped)")
    parser.add_argument("--only", nargs="*", choices=list(RUNS), default=list(RUNS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "offline")
    rows = []
    for name in args.only:
        run_dir = train(args.out.resolve(), name, args.steps)
        summary = json.loads((run_dir / "metrics.json").read_text())
        wall = (run_dir / "wall_s.txt").read_text().strip() if (run_dir / "wall_s.txt").is_file() else "?"
        scores = vae_row(run_dir) if name.startswith("vae") else caption_row(run_dir)
        rows.append((name, summary["global_step"], wall, scores))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    print(f"{'run':<10} {'steps':>6} {'wall s':>7}  scores on the test split")
    for name, steps, wall, scores in rows:
        shown = "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items())
        print(f"{name:<10} {steps:>6} {wall:>7}  {shown}")


if __name__ == "__main__":
    main()
