"""Conditional GAN quality side by side: the shipped experiment against variants, one table.

Each variant is one ``xmodal-train`` run (CSV logger, offline, its own run id); the table shows
the validation curve of FID and of the judge's conditional accuracy (``judge_acc``: an
independent classifier, xmodal/metrics/judge.py), the test figures of the best checkpoint and the
wall time. Example (the figures of BENCHMARKS.md "Generative quality (issue 18)")::

    python benchmarks/gan_quality.py --experiment mnist_gan \\
        --variant base: --variant aux:model.gan.aux_weight=1.0

Session 18's text → image rows ("The kind 0.60 was noise"), two seeds each::

    python benchmarks/gan_quality.py --experiment shapes_text2image_gan \\
        --variant shipped:seed=0 --variant shipped1:seed=1 \\
        --variant nocolour:~model.gan.aux_labels.colour --variant transpose:model.gan.g_upsample=transpose
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import time
from pathlib import Path


def run_variant(experiment: str, name: str, overrides: list[str], out: Path, data_dir: Path) -> dict:
    run_id = f"{experiment}-{name}"
    cmd = [
        "xmodal-train",
        f"experiment={experiment}",
        "logger=csv",
        f"paths.output_dir={out}",
        f"paths.data_dir={data_dir}",
        f"run.id={run_id}",
        *overrides,
    ]
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    wall = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"{name}: exit {result.returncode}\n{result.stderr[-2000:]}")
    run_dir = next(out.glob(f"*/{run_id}"))
    curve = [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    val = [row for row in curve if "val/fid" in row]
    test = json.loads((run_dir / "metrics.json").read_text()).get("test", {})
    return {"name": name, "overrides": overrides, "val": val, "test": test, "wall_s": wall}


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="mnist_gan")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME:OVERRIDES (space-separated Hydra overrides; empty = the shipped experiment)",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-gan-quality"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    args = parser.parse_args()
    variants = args.variant or ["shipped:"]
    rows = []
    for spec in variants:
        name, _, overrides = spec.partition(":")
        rows.append(run_variant(args.experiment, name, shlex.split(overrides), args.out, args.data_dir))
    print(f"\n{args.experiment}: val judge_acc / FID per validation; test = best checkpoint (by val FID)")
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    """The Markdown table of :func:`run_variant` rows: validation curves, test figures, wall time."""
    print(
        "| variant | overrides | val judge_acc | val judge_colour_acc | val FID | test judge_acc | "
        "test judge_colour_acc | test cond_acc | test FID | test sample_roughness | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        judge = " / ".join(fmt(v.get("val/judge_acc")) for v in row["val"])
        colour = " / ".join(fmt(v.get("val/judge_colour_acc")) for v in row["val"])
        fid = " / ".join(fmt(v.get("val/fid")) for v in row["val"])
        test = row["test"]
        print(
            f"| {row['name']} | {' '.join(row['overrides']) or '(shipped)'} | {judge} | {colour} | {fid} | "
            f"{fmt(test.get('test/judge_acc'))} | {fmt(test.get('test/judge_colour_acc'))} | "
            f"{fmt(test.get('test/cond_acc'))} | {fmt(test.get('test/fid'))} | "
            f"{fmt(test.get('test/sample_roughness'))} | {row['wall_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
