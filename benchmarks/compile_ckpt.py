"""Step time and activation memory with ``trainer.compile``, ``model.activation_checkpointing`` and
``trainer.channels_last`` each off/on, side by side in one run, for the default captioner
(shapes_caption, 64 px) and the MNIST GAN (mnist_gan, 32 px grey, label-conditional).

Each variant is built by the factory from the experiment's config plus its overrides and trained
by a Lightning Trainer (the task's own ``training_step``; a GAN step is one iteration: n_critic D
steps + 1 G step) on fixed in-memory loader batches (uint8 images, token ids), so the data
pipeline is out of the picture. Step time: median over the timed steps after the warm-up ones;
the first step (which compiles) is shown apart. Memory: the bytes autograd saves for backward in
a step (activations, parameters excluded; a checkpointed layer keeps only its input), the part
activation checkpointing and compile change; on CUDA also the peak allocated.

    python benchmarks/compile_ckpt.py                         # CPU; inductor if a C++ compiler exists
    python benchmarks/compile_ckpt.py --backend aot_eager     # traced, no code generation
    python benchmarks/compile_ckpt.py --device cuda --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import time
import warnings
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from xmodal.config import compose_config
from xmodal.data.tokenizer import WordTokenizer
from xmodal.factory import build_task

WORDS = "a small large red green blue circle square triangle in the top bottom left right and"
VARIANTS = {
    "caption": {
        "baseline": [],
        "compile": ["trainer.compile=true"],
        "activation ckpt": ["model.activation_checkpointing=true"],
        "channels_last": ["trainer.channels_last=true"],
    },
    "gan": {
        "baseline": [],
        "compile": ["trainer.compile=true"],
        "channels_last": ["trainer.channels_last=true"],
    },
}
EXPERIMENTS = {"caption": "shapes_caption", "gan": "mnist_gan"}


class Batches(Dataset):
    """Fixed loader rows of the experiment's data shape (what the stream would deliver)."""

    def __init__(self, cfg: Any, tokenizer: WordTokenizer, rows: int):
        gen = torch.Generator().manual_seed(0)
        size, channels = cfg.data.image_size, cfg.data.image_channels
        self.image = torch.randint(0, 256, (rows, channels, size, size), generator=gen, dtype=torch.uint8)
        self.text = torch.randint(4, len(tokenizer), (rows, cfg.data.max_text_len), generator=gen)
        self.text[:, 0] = tokenizer.bos_id
        self.label = torch.randint(0, 10, (rows,), generator=gen)

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "image": self.image[i],
            "text": self.text[i],
            "label": self.label[i],
            "valid": torch.tensor(True),
        }


class StepMeter(L.Callback):
    """Wall time of every training batch, and the bytes autograd saved for backward in it."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.saved: list[int] = []
        self._start, self._bytes, self._hooks, self._seen = 0.0, 0, None, set()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, torch.nn.Parameter):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self._seen:  # a storage saved twice is held once
                self._seen.add(storage.data_ptr())
                self._bytes += storage.nbytes()
        return tensor

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        _sync(pl_module.device)
        self._bytes, self._seen = 0, set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        _sync(pl_module.device)
        self.seconds.append(time.perf_counter() - self._start)
        self._hooks.__exit__(None, None, None)
        self.saved.append(self._bytes)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Variant:
    """One task built with one variant's overrides, fitted once per round by a fresh Trainer: its
    nets are compiled in the first fit and stay compiled (in place) for the later ones."""

    def __init__(self, task_name: str, overrides: list[str], args: argparse.Namespace):
        torch.manual_seed(0)
        compile_keys = [f"trainer.compile_backend={args.backend}", f"trainer.compile_mode={args.mode}"]
        self.cfg = compose_config([f"experiment={EXPERIMENTS[task_name]}", *compile_keys, *overrides])
        self.tokenizer = WordTokenizer.fit([WORDS])
        self.task = build_task(self.cfg, self.tokenizer)
        self.args = args
        self.first_s = 0.0
        self.seconds: list[float] = []
        self.saved: list[int] = []
        self.peak_mb = 0.0
        """CUDA: the peak memory allocated in any of its fits."""

    def fit(self) -> None:
        args = self.args
        batch = args.batch or self.cfg.data.batch_size
        meter = StepMeter()
        trainer = L.Trainer(
            accelerator="gpu" if args.device == "cuda" else "cpu",
            devices=1,
            precision=args.precision,
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[meter],
        )
        rows = Batches(self.cfg, self.tokenizer, batch * (args.warmup + args.steps))
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.fit(self.task, DataLoader(rows, batch_size=batch))
        if args.device == "cuda":
            self.peak_mb = max(self.peak_mb, torch.cuda.max_memory_allocated() / 2**20)
        if not self.seconds:
            self.first_s = meter.seconds[0]
        self.seconds += meter.seconds[args.warmup :]
        self.saved += meter.saved[args.warmup :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--backend", default=None, help="trainer.compile_backend (default: inductor if g++)")
    parser.add_argument("--mode", default="default", help="trainer.compile_mode")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--batch", type=int, default=0, help="rows per step (0: the experiment's)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps a round (the first compiles)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps a round")
    parser.add_argument("--rounds", type=int, default=2, help="fits of each variant, interleaved")
    args = parser.parse_args()
    # Lightning's per-fit banners and known warnings, dynamo's graph-break notes: one table instead.
    for name in ("lightning.pytorch", "lightning.fabric", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.backend is None:
        compiler = args.device == "cuda" or any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))
        args.backend = "inductor" if compiler else "aot_eager"
        if not compiler:
            print("no C++ compiler on PATH: inductor cannot run on this CPU; compile uses aot_eager")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, {args.precision}, "
        f"compile backend {args.backend} ({args.mode})"
    )
    header = f"{'task':8} {'variant':16} {'step ms':>9} {'× base':>7} {'first step s':>13} {'saved MB':>9}"
    if args.device == "cuda":
        header += f" {'peak MB':>8}"
    print(header)
    start = time.perf_counter()
    for task_name in args.tasks:
        variants = {name: Variant(task_name, o, args) for name, o in VARIANTS[task_name].items()}
        for _ in range(args.rounds):  # interleaved: a shared machine's load drifts over all alike
            for variant in variants.values():
                variant.fit()
        base = statistics.median(variants["baseline"].seconds)
        for name, v in variants.items():
            step = statistics.median(v.seconds)
            line = (
                f"{task_name:8} {name:16} {step * 1e3:9.1f} {step / base:7.2f} "
                f"{v.first_s:13.1f} {max(v.saved) / 2**20:9.1f}"
            )
            if args.device == "cuda":
                line += f" {v.peak_mb:8.0f}"
            print(line, flush=True)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
