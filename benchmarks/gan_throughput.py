"""Iterations/s of AdversarialTask under Lightning vs a hand-written PyTorch loop, side by side.

Same DCGAN nets (built from the same config), same in-memory data and batch, same precision,
same per-iteration work (n_critic D steps on detached fakes, one G step, EMA update). The two are
timed alternately, ``--repeats`` times each, and the ratio of medians is printed (goal ≥ 0.97×),
so drift in a shared machine's load hits both sides alike.

    python benchmarks/gan_throughput.py                      # CPU, 32 px, 32-true
    python benchmarks/gan_throughput.py --precision bf16-mixed --device cuda --size 64 --width 64
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from xmodal.config import compose_config
from xmodal.data.tokenizer import SPECIALS
from xmodal.nn.gan import build_gan_nets
from xmodal.tasks.gan.config import GanModelConfig
from xmodal.tasks.gan.task import AdversarialTask


class Images(Dataset):
    """Fixed random images in [-1, 1] as task batches (the loader is identical for both sides)."""

    def __init__(self, n: int, channels: int, size: int):
        self.x = torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[i], "valid": torch.tensor(True)}


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    overrides = [
        "model=gan",
        f"model.gan.g_width={args.width}",
        f"model.gan.d_width={args.width}",
        f"model.gan.n_critic={args.n_critic}",
    ]
    return OmegaConf.to_container(compose_config(overrides).model, resolve=True)


def data_shape(args: argparse.Namespace) -> dict[str, int]:
    return {
        "image_size": args.size,
        "image_channels": 3,
        "audio_mels": 8,
        "audio_frames": 8,
        "max_text_len": 8,
    }


def loader(args: argparse.Namespace) -> DataLoader:
    return DataLoader(
        Images(args.batch * 8, 3, args.size), batch_size=args.batch, shuffle=False, drop_last=True
    )


class Timer(L.Callback):
    """Wall time from the start of batch ``warmup`` to the end of training."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.seconds = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.fit_loop.total_batch_idx == self.warmup:
            _sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        _sync(pl_module.device)
        self.seconds = time.perf_counter() - self.start


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def lightning_run(args: argparse.Namespace, nets: tuple) -> float:
    task = AdversarialTask(model_config(args), list(SPECIALS), data_shape(args), nets=copy.deepcopy(nets))
    timer = Timer(args.warmup)
    iterations = args.warmup + args.iterations
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision=args.precision,
        max_steps=iterations * (args.n_critic + 1),
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(task, loader(args))
    return args.iterations / timer.seconds


def hand_run(args: argparse.Namespace, nets: tuple) -> float:
    """The plain PyTorch loop a careful user would write for the same GAN."""
    cfg = model_config(args)["gan"]
    device = torch.device(args.device)
    g, d = (copy.deepcopy(n).to(device) for n in nets)
    ema = copy.deepcopy(g).requires_grad_(False)
    g_opt = torch.optim.Adam(g.parameters(), lr=cfg["g_lr"], betas=tuple(cfg["g_betas"]))
    d_opt = torch.optim.Adam(d.parameters(), lr=cfg["d_lr"], betas=tuple(cfg["d_betas"]))
    bf16 = args.precision == "bf16-mixed"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    done, start = 0, 0.0
    total = args.warmup + args.iterations
    while done < total:
        for batch in loader(args):
            if done == args.warmup:
                _sync(device)
                start = time.perf_counter()
            if done == total:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            real, n = batch["image"], batch["image"].shape[0]
            for _ in range(args.n_critic):
                with autocast:
                    with torch.no_grad():
                        fake = g(torch.randn(n, cfg["z_dim"], device=device), batch)
                    d_real, d_fake = d(real, batch).float(), d(fake, batch).float()
                loss = (F.relu(1 - d_real) + F.relu(1 + d_fake)).mean()
                d_opt.zero_grad(set_to_none=True)
                loss.backward()
                d_opt.step()
            with autocast:
                fake = g(torch.randn(n, cfg["z_dim"], device=device), batch)
                g_loss = -d(fake, batch).float().mean()
            g_opt.zero_grad(set_to_none=True)
            g_loss.backward()
            g_opt.step()
            with torch.no_grad():
                for e, p in zip(ema.parameters(), g.parameters(), strict=True):
                    e.lerp_(p, 1 - cfg["ema_decay"])
                for e, b in zip(ema.buffers(), g.buffers(), strict=True):
                    e.copy_(b)
            done += 1
    _sync(device)
    return args.iterations / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--n-critic", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    nets = build_gan_nets(GanModelConfig.from_node(model_config(args)), len(SPECIALS), 0, data_shape(args))
    task_rates, hand_rates = [], []
    for _ in range(args.repeats):
        hand_rates.append(hand_run(args, nets))
        task_rates.append(lightning_run(args, nets))
    task, hand = statistics.median(task_rates), statistics.median(hand_rates)
    print(
        f"device={args.device} precision={args.precision} size={args.size} width={args.width} "
        f"batch={args.batch} n_critic={args.n_critic} iterations={args.iterations}×{args.repeats} "
        f"threads={torch.get_num_threads()}"
    )
    print(f"hand-written loop : {hand:8.3f} it/s  runs {[round(r, 3) for r in hand_rates]}")
    print(f"AdversarialTask   : {task:8.3f} it/s  runs {[round(r, 3) for r in task_rates]}")
    print(f"ratio task/hand   : {task / hand:.3f}×  (goal ≥ 0.97×)")


if __name__ == "__main__":
    main()
