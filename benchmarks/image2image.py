"""Image → image translation on shapes pairs (outline → filled): pix2pix vs L1 only vs identity.

    python benchmarks/image2image.py [--steps 300] [--threads 1] [--variants pix2pix l1] [overrides...]

Trains ``experiment=shapes_image2image`` for ``--steps`` iterations once per variant (the same
seed, data and nets; ``l1`` is ``model.loss=none``: no discriminator) and scores the identity
baseline (the source copied as the output) with the same metrics on the same val/test splits.
Prints one table: val (the best checkpoint's validation, by val SSIM) and test L1 / PSNR / SSIM /
FID, with wall time per run. Extra arguments are Hydra overrides for every run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

VARIANTS = {"pix2pix": ["model.loss=lsgan"], "l1": ["model.loss=none"]}
COLUMNS = ("l1", "psnr", "ssim", "fid")


def run_variant(name: str, overrides: list[str]) -> tuple[dict[str, Any], float]:
    """Train one variant; its metrics.json summary (plus ``best_val``: the validation with the
    best SSIM, its step in iterations) and the wall time of the whole run."""
    from xmodal.config import compose_config
    from xmodal.tasks.config import task_config
    from xmodal.train import train

    cfg = compose_config([*overrides, *VARIANTS[name], f"run.id={name}"])
    steps_per_iteration = task_config(cfg).lightning_max_steps(1)
    start = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - start
    run_dir = Path(cfg.paths.output_dir) / cfg.experiment_name / name
    summary = json.loads((run_dir / "metrics.json").read_text())
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary["best_val"] = max(history, key=lambda row: row["val/ssim"])
    summary["best_val"]["iteration"] = summary["best_val"]["step"] // steps_per_iteration
    return summary, wall


@torch.no_grad()
def identity_scores(overrides: list[str]) -> dict[str, dict[str, float]]:
    """The metrics of copying the source, on the val and test splits (valid rows only)."""
    from xmodal.config import compose_config
    from xmodal.data.batch import to_model_units
    from xmodal.factory import build_datamodule, prepare_data
    from xmodal.metrics.features import domain_classifier
    from xmodal.metrics.fid import GenerativeMetrics
    from xmodal.metrics.translation import TranslationMetrics

    cfg = compose_config(overrides)
    datamodule = build_datamodule(cfg, prepare_data(cfg))
    datamodule.setup("validate")  # the tokenizer its batches collate captions with
    m = cfg.model
    # The classifier the runs trained and cached: the same FID features.
    classifier = (
        domain_classifier(
            datamodule.shards_dir, datamodule.decode, m.num_classes, m.feature_steps, role=m.target
        )
        if m.fid
        else None
    )
    roles = dict(cfg.data.roles)
    out = {}
    for split, loader in (("val", datamodule.val_dataloader()), ("test", datamodule.test_dataloader())):
        metrics = TranslationMetrics(GenerativeMetrics(classifier) if classifier is not None else None)
        for batch in loader:
            batch = to_model_units(batch, roles)
            valid = batch["valid"]
            metrics.update(batch[m.source][valid], batch[m.target][valid])
        out[split] = metrics.compute()
    return out


def row(name: str, steps: str, val: dict[str, float], test: dict[str, float], wall: str) -> str:
    def cell(values: dict[str, float], key: str) -> str:
        return (
            "—"
            if key not in values
            else f"{values[key]:.2f}"
            if key in ("fid", "psnr")
            else f"{values[key]:.4f}"
        )

    cells = [cell(val, k) for k in COLUMNS] + [cell(test, k) for k in COLUMNS]
    return f"| {name} | {steps} | " + " | ".join(cells) + f" | {wall} |"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300, help="iterations per run (D + G step each)")
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared box)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    args, extra = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    root = args.out or Path(tempfile.mkdtemp(prefix="image2image-"))
    overrides = [
        "experiment=shapes_image2image",
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={args.val_every}",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        f"paths.output_dir={root / 'outputs'}",
        f"paths.data_dir={root / 'data'}",
        *extra,
    ]
    results = {name: run_variant(name, overrides) for name in args.variants}
    baseline = identity_scores(overrides)
    print(
        f"\nmachine: {platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); runs in {root}"
    )
    header = "| output | iterations | " + " | ".join(f"val {k}" for k in COLUMNS)
    print(header + " | " + " | ".join(f"test {k}" for k in COLUMNS) + " | wall |")
    print("|" + "---|" * (3 + 2 * len(COLUMNS)))
    print(row("identity (source copied)", "—", baseline["val"], baseline["test"], "—"))
    for name, (summary, wall) in results.items():
        best = summary["best_val"]
        val = {k: best[f"val/{k}"] for k in COLUMNS if f"val/{k}" in best}
        test = {k: summary["test"][f"test/{k}"] for k in COLUMNS if f"test/{k}" in summary["test"]}
        label = f"{name} (best val SSIM at {best['iteration']})"
        print(row(label, str(args.steps), val, test, f"{wall:.0f} s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
