"""Captioning speed, side by side in one process: decoding with vs without the key/value cache, and
Lightning's training step vs a hand-written PyTorch loop over the same nets, data and optimizer.

    python benchmarks/caption_decode.py [--ckpt CKPT] [--steps 40] [--rounds 3]

Decoding: captions/s for greedy and beam 5 on a batch of 64 shapes validation images, (a) forced
to the full ``max_decode_len`` (EOS barred until then: the cost-versus-length case the cache is
for) and (b) at natural length with a trained ``--ckpt`` (e.g. the default run's best.ckpt).
Training: seconds per step for ``trainer.fit`` (no validation, logging or checkpoints) and for a
plain loop doing the same work (AdamW, the task's LR schedule, gradient clipping at 1.0), the two
alternated ``--rounds`` times so machine load hits both alike; the ratio is plain / Lightning
step time (≥ 0.97 = Lightning costs at most 3 %).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch

from xmodal.config import compose_config
from xmodal.data.batch import to_model_units
from xmodal.evaluate import load_task
from xmodal.factory import build_datamodule, build_task, prepare_data
from xmodal.tasks.caption.task import CaptionTask


def captions_per_second(task: CaptionTask, images: torch.Tensor, repeats: int, **options: object) -> float:
    task.generate_ids(images[:8], **options)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        task.generate_ids(images, **options)
    return repeats * len(images) / (time.perf_counter() - start)


def decode_table(task: CaptionTask, images: torch.Tensor, forced: bool, rounds: int = 3) -> list[str]:
    """Best of ``rounds`` interleaved measurements per setting (a shared machine only slows runs down)."""
    max_len = int(task.cfg.max_decode_len)
    settings = [(beam, cache) for beam in (1, 5) for cache in (True, False)]
    rates: dict[tuple[int, bool], float] = {s: 0.0 for s in settings}
    for _ in range(rounds):
        for beam, cache in settings:
            options: dict[str, object] = {"beam_size": beam, "decode_cache": cache}
            if forced:
                options["min_decode_len"] = max_len - 2  # every caption runs to the full length
            rate = captions_per_second(task, images, 1, **options)
            rates[beam, cache] = max(rates[beam, cache], rate)
    rows = []
    for beam in (1, 5):
        cached, uncached = rates[beam, True], rates[beam, False]
        name = "greedy" if beam == 1 else f"beam {beam}"
        rows.append(f"| {name} | {cached:.0f} | {uncached:.0f} | {cached / uncached:.2f}× |")
    return rows


def lightning_steps(cfg, tokenizer, datamodule, steps: int) -> float:
    """Seconds per step of trainer.fit over ``steps`` steps after 5 warm-up steps."""
    L.seed_everything(0, workers=True)
    task = build_task(cfg, tokenizer)
    times: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            if trainer.global_step == 5:
                times.append(time.perf_counter())

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps + 5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        callbacks=[Clock()],
    )
    trainer.fit(task, datamodule=datamodule)
    return (time.perf_counter() - times[0]) / steps


def plain_steps(cfg, tokenizer, datamodule, steps: int) -> float:
    """The same training by hand: same nets (the task's modules), data, optimizer and schedule."""
    L.seed_everything(0, workers=True)
    task = build_task(cfg, tokenizer).train()
    opt_config = task.configure_optimizers.__func__  # schedule needs estimated_stepping_batches

    class _Trainer:
        estimated_stepping_batches = steps + 5

    task.trainer = _Trainer()  # type: ignore[assignment]
    config = opt_config(task)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    smoothing = task.cfg.label_smoothing
    start = 0.0
    for step, batch in enumerate(itertools.islice(iter(datamodule.train_dataloader()), steps + 5)):
        if step == 5:
            start = time.perf_counter()
        loss = task.loss(to_model_units(batch), smoothing)  # the task's own hook does this under Lightning
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    return (time.perf_counter() - start) / steps


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", type=Path, help="a trained caption checkpoint (natural-length decoding)")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config([f"paths.data_dir={os.environ.get('XMODAL_DATA', Path(tmp) / 'data')}"])
        datamodule = build_datamodule(cfg, prepare_data(cfg))
        tokenizer = datamodule.build_tokenizer()
        images = datamodule.sample_batch(64, "val")["image"]
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
        )
        header = [
            "| decoding (64 images) | cached captions/s | uncached captions/s | speed-up |",
            "|---|---|---|---|",
        ]
        untrained = build_task(cfg, tokenizer).eval()
        print(f"\nfull length ({cfg.model.max_decode_len} tokens), untrained weights")
        print("\n".join(header + decode_table(untrained, images, forced=True)))
        if args.ckpt:
            print(f"\nnatural length, {args.ckpt}")
            print("\n".join(header + decode_table(load_task(args.ckpt).eval(), images, forced=False)))
        light, plain = [], []
        for _ in range(args.rounds):
            light.append(lightning_steps(cfg, tokenizer, datamodule, args.steps))
            plain.append(plain_steps(cfg, tokenizer, datamodule, args.steps))
        lm, pm = statistics.median(light), statistics.median(plain)
        print(
            f"\ntraining step, batch {cfg.data.batch_size}, median of {args.rounds} rounds × {args.steps} steps"
        )
        print("| loop | s/step | rounds |\n|---|---|---|")
        print(f"| Lightning (CaptionTask) | {lm:.4f} | {', '.join(f'{t:.4f}' for t in light)} |")
        print(f"| plain PyTorch | {pm:.4f} | {', '.join(f'{t:.4f}' for t in plain)} |")
        print(f"Lightning speed relative to plain PyTorch: {pm / lm:.3f}× (goal ≥ 0.97)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
