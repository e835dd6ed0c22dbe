"""Time the README's main job (`xmodal-train`, default experiment) against the foundation targets.

    python benchmarks/default_run.py [extra overrides...]

Runs the job from scratch in a temporary directory (data generation included) and prints wall
time and val/test BLEU-4 beside their targets (≤ 300 s on 2 CPU cores, val BLEU-4 ≥ 0.5).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S, BLEU_TARGET = 300.0, 0.5


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run(
            ["xmodal-train", "trainer.enable_progress_bar=false", *sys.argv[1:]],
            cwd=tmp,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - start
        run_dir = next(Path(tmp).glob("outputs/*/*/metrics.json")).parent
        summary = json.loads((run_dir / "metrics.json").read_text())
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # best.ckpt is chosen by val CIDEr-D; BLEU-4 is read from the validations' history.
    val = max(row["val/bleu4"] for row in history)
    test = summary.get("test", {}).get("test/bleu4", float("nan"))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"{'metric':<22}{'measured':>10}{'target':>10}{'ratio':>8}")
    print(f"{'wall time (s)':<22}{wall:>10.1f}{BUDGET_S:>10.0f}{wall / BUDGET_S:>8.2f}  (≤ 1 passes)")
    print(f"{'best val BLEU-4':<22}{val:>10.3f}{BLEU_TARGET:>10.2f}{val / BLEU_TARGET:>8.2f}  (≥ 1 passes)")
    print(f"{'test BLEU-4 (best)':<22}{test:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
