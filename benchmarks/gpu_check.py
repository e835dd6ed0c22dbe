"""One-command check on a CUDA machine: every task under bf16-mixed and 16-mixed, nccl DDP, FSDP2,
loader → GPU throughput, MFU, and Lightning's step against a plain PyTorch loop. Prints one table.

    python benchmarks/gpu_check.py                 # on the GPU machine (about 6-8 minutes on one H200)
    python benchmarks/gpu_check.py --cpu-smoke     # the same rows, tiny, on CPU: checks the script itself

Each training row is a real ``xmodal-train`` run in a fresh temporary directory (data generated
on the first run, then cached for the others) for ``--steps`` steps; its figures come from the
run's own ``perf/*`` metrics (xmodal/callbacks/throughput.py: samples/s over ranks, FLOPs of a
whole step, MFU against the device's 16-bit peak) and the wall time of the command. A row that
fails prints its last error line instead of figures, and the script goes on.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Row:
    name: str
    overrides: list[str]
    figures: dict[str, str] = field(default_factory=dict)


def training_rows(gpus: int, smoke: bool) -> list[Row]:
    precisions = ["bf16-mixed", "16-mixed"] if not smoke else ["32-true"]
    device = ["trainer=cpu"] if smoke else ["trainer=gpu", "trainer.devices=1"]
    rows = []
    for experiment in ("shapes_caption", "shapes_text2image_gan", "shapes_vae", "shapes_text2audio_vae"):
        for precision in precisions:
            rows.append(
                Row(
                    f"{experiment} {precision}",
                    [f"experiment={experiment}", *device, f"trainer.precision={precision}"],
                )
            )
    if not smoke:
        rows.append(
            Row(
                f"shapes_caption ddp×{gpus} bf16",
                ["trainer=ddp", f"trainer.devices={gpus}", "trainer.precision=bf16-mixed"],
            )
        )
        fsdp_devices = max(gpus, 1)
        rows.append(
            Row(
                f"shapes_caption fsdp2×{fsdp_devices} bf16",
                [
                    "trainer=fsdp2",
                    "trainer.accelerator=gpu",
                    f"trainer.devices={fsdp_devices}",
                    "trainer.precision=bf16-mixed",
                ],
            )
        )
    return rows


def read_perf(run_root: Path) -> dict[str, float]:
    """The last value of each ``perf/*`` column of the run's metrics.csv."""
    found: dict[str, float] = {}
    for path in run_root.rglob("metrics.csv"):
        with open(path) as f:
            for record in csv.DictReader(f):
                for key, value in record.items():
                    if key and key.startswith("perf/") and value:
                        found[key] = float(value)
    return found


def run_training(row: Row, steps: int, data_dir: Path, extra: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "xmodal-train",
            *row.overrides,
            f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}",
            "trainer.limit_val_batches=2",
            f"trainer.log_every_n_steps={max(1, min(10, steps // 3))}",
            "test_after_fit=false",
            "logger=csv",
            f"paths.data_dir={data_dir}",
            f"paths.output_dir={tmp}",
            *extra,
        ]
        start = time.perf_counter()
        result = subprocess.run(
            args, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"}
        )
        wall = time.perf_counter() - start
        if result.returncode != 0:
            lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
            row.figures["error"] = (lines[-1] if lines else f"exit {result.returncode}")[:90]
            return
        perf = read_perf(Path(tmp))
    row.figures["samples/s"] = f"{perf.get('perf/samples_per_s', float('nan')):.0f}"
    flops = perf.get("perf/flops_per_step")
    row.figures["GFLOP/step"] = f"{flops / 1e9:.2f}" if flops else "-"
    mfu = perf.get("perf/mfu")
    row.figures["MFU"] = f"{mfu:.1%}" if mfu else "-"
    row.figures["wall s"] = f"{wall:.0f}"


def loader_row(device: str, batches: int, data_dir: Path) -> Row:
    """The training loader (4 workers, pinned memory) handing batches to ``device``: samples/s."""
    row = Row(f"loader → {device}", [])
    code = f"""
import time, torch
from xmodal.config import compose_config
from xmodal.factory import build_datamodule, prepare_data
cfg = compose_config(["data.num_workers=4", "data.batch_size=256", "paths.data_dir={data_dir}"])
dm = build_datamodule(cfg, prepare_data(cfg))
dm.setup("fit")
loader = dm.train_dataloader()
seen, start = 0, None
for i, batch in enumerate(loader):
    image = batch["image"].to("{device}", non_blocking=True)
    if i == 2:
        torch.cuda.synchronize() if "{device}" == "cuda" else None
        start, seen = time.perf_counter(), 0
    seen += image.shape[0]
    if i == {batches} + 2:
        break
torch.cuda.synchronize() if "{device}" == "cuda" else None
print(seen / (time.perf_counter() - start))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode:
        row.figures["error"] = (result.stderr.strip().splitlines() or ["failed"])[-1][:90]
    else:
        row.figures["samples/s"] = f"{float(result.stdout.split()[-1]):.0f}"
    return row


def plain_ratio_row(device: str, steps: int, data_dir: Path, precision: str) -> Row:
    """The captioner's step in a plain PyTorch loop (same task, same batches on the device) beside
    Lightning's, as steps/s each and their ratio."""
    row = Row(f"plain loop vs Lightning ({precision})", [])
    code = f"""
import time, torch, lightning as L
from xmodal.config import compose_config
from xmodal.factory import build_datamodule, build_task, prepare_data
from xmodal.data.batch import to_model_units
cfg = compose_config(["data.num_workers=2", "paths.data_dir={data_dir}", "trainer.precision={precision}"])
dm = build_datamodule(cfg, prepare_data(cfg)); dm.setup("fit")
batches = []
for i, b in enumerate(dm.train_dataloader()):
    batches.append({{k: (v.to("{device}") if torch.is_tensor(v) else v) for k, v in b.items()}})
    if len(batches) == 8: break
def fresh():
    return build_task(cfg, dm.tokenizer).to("{device}")
task = fresh()
# The same step without Lightning: the task's loss, AdamW, clipping as trainer.gradient_clip_val.
opt = torch.optim.AdamW(task.parameters(), lr=float(cfg.model.lr))
clip = cfg.trainer.get("gradient_clip_val")
dtype = torch.bfloat16 if "bf16" in "{precision}" else torch.float16 if "16" in "{precision}" else None
def step(i):
    batch = to_model_units(dict(batches[i % len(batches)]))
    with torch.autocast("{device}", dtype=dtype, enabled=dtype is not None):
        loss = task.loss(batch, task.cfg.label_smoothing)
    opt.zero_grad(set_to_none=True); loss.backward()
    if clip: torch.nn.utils.clip_grad_norm_(task.parameters(), float(clip))
    opt.step()
for i in range(5): step(i)
torch.cuda.synchronize() if "{device}" == "cuda" else None
start = time.perf_counter()
for i in range({steps}): step(i)
torch.cuda.synchronize() if "{device}" == "cuda" else None
plain = {steps} / (time.perf_counter() - start)
class Timer(L.Callback):
    def on_train_batch_end(self, trainer, *a):
        if trainer.global_step == 5: self.start = time.perf_counter()
# A DataLoader over the same batches (a bare list would be read as a list of dataloaders).
loader = torch.utils.data.DataLoader([batches[i % len(batches)] for i in range({steps} + 5)], batch_size=None, collate_fn=lambda b: b)
timer = Timer()
trainer = L.Trainer(max_steps={steps} + 5, accelerator="{"gpu" if device == "cuda" else "cpu"}", devices=1,
    precision="{precision}", logger=False, enable_checkpointing=False, enable_progress_bar=False,
    enable_model_summary=False, callbacks=[timer], limit_val_batches=0)
trainer.fit(fresh(), loader)
torch.cuda.synchronize() if "{device}" == "cuda" else None
lightning = {steps} / (time.perf_counter() - timer.start)
print(plain, lightning)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode:
        row.figures["error"] = (result.stderr.strip().splitlines() or ["failed"])[-1][:90]
        return row
    plain, lightning = (float(v) for v in result.stdout.split()[-2:])
    row.figures["samples/s"] = (
        f"plain {plain:.1f} steps/s, Lightning {lightning:.1f} ({lightning / plain:.2f}×)"
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per row (default 300; smoke 6)"
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny rows on CPU: checks the script only")
    args = parser.parse_args()
    import torch

    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: run on the GPU machine, or pass --cpu-smoke", file=sys.stderr)
        return 2
    gpus = torch.cuda.device_count()
    steps = args.steps or (6 if smoke else 300)
    tiny = (
        ["data.shapes.n_train=256", "data.shapes.n_val=64", "data.shapes.n_test=64", "data.batch_size=16"]
        if smoke
        else []
    )
    device = "cpu" if smoke else "cuda"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as data:
        data_dir = Path(data)
        rows = training_rows(gpus, smoke)
        for row in rows:
            run_training(row, steps, data_dir, tiny)
            print(f"  done: {row.name} {row.figures}", file=sys.stderr, flush=True)
        if not smoke:  # the loader and plain-loop rows read the default dataset, generated above
            rows.append(loader_row(device, 40, data_dir))
            for precision in ("bf16-mixed", "16-mixed"):
                rows.append(plain_ratio_row(device, steps // 3, data_dir, precision))
        elif smoke:
            rows.append(plain_ratio_row(device, 4, data_dir, "32-true"))
    name = torch.cuda.get_device_name() if not smoke else platform.processor() or platform.machine()
    print(
        f"\nmachine: {name} ×{max(gpus, 1)}, torch {torch.__version__}, {steps} steps per training row, "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    columns = ["samples/s", "GFLOP/step", "MFU", "wall s"]
    print(f"{'row':<40}" + "".join(f"{c:>12}" for c in columns))
    for row in rows:
        if "error" in row.figures:
            print(f"{row.name:<40}  FAILED: {row.figures['error']}")
        elif "GFLOP/step" not in row.figures:
            print(f"{row.name:<40}  {row.figures.get('samples/s', '')}")
        else:
            print(f"{row.name:<40}" + "".join(f"{row.figures.get(c, '-'):>12}" for c in columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
