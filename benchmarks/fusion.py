"""Each ``model.fusion`` on one experiment, same steps and seed, side by side in one table.

One ``xmodal-train`` run per fusion (the runner of benchmarks/gan_quality.py: CSV logger,
offline, its own run id), run one after another; the table shows the validation curve of FID and
of the judge's conditional accuracy, the test figures of the best checkpoint (by val FID) and the
wall time. Example (the figures of BENCHMARKS.md "Fusion choices (issue 17)")::

    python benchmarks/fusion.py --experiment shapes_text2image_gan --max-steps 600
    python benchmarks/fusion.py --fusion cbn --fusion cross_attention --extra model.condition=[text,audio]
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the sibling runner

from gan_quality import print_table, run_variant  # noqa: E402

FUSIONS = ("cbn", "concat", "film", "cross_attention")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="shapes_text2image_gan")
    parser.add_argument("--fusion", action="append", default=[], help=f"one of {FUSIONS} (default: all)")
    parser.add_argument("--max-steps", type=int, default=600, help="GAN iterations per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra", action="append", default=[], help="a Hydra override for every row")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-fusion"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    args = parser.parse_args()
    rows = []
    for fusion in args.fusion or FUSIONS:
        overrides = [f"model.fusion={fusion}", f"trainer.max_steps={args.max_steps}", f"seed={args.seed}"]
        row = run_variant(args.experiment, fusion, [*overrides, *args.extra], args.out, args.data_dir)
        rows.append(row)
        print(f"{fusion}: {row['test']} ({row['wall_s']:.0f} s)", flush=True)  # partial results
    print(
        f"\n{args.experiment}, {args.max_steps} iterations, seed {args.seed} {' '.join(args.extra)}; "
        f"{platform.processor() or platform.machine()}: val judge_acc / FID per validation; "
        "test = best checkpoint (by val FID)"
    )
    print_table(rows)


if __name__ == "__main__":
    main()
