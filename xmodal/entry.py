"""Console entry points of the Hydra commands: ``--help`` answered here, before torch is imported.

``xmodal-train`` and ``xmodal-eval`` are Hydra apps whose own ``--help`` imports torch and
Lightning first (~20 s) and prints a config dump. These entry points print what the command does,
examples, the config groups and the common overrides in well under a second, and otherwise hand
over to the real ``main`` (Hydra's ``--hydra-help``, ``--cfg job`` and ``-m`` work as before).
"""

from __future__ import annotations

import sys
from pathlib import Path

CONF = Path(__file__).parent / "conf"

TRAIN = """\
usage: xmodal-train [OVERRIDE ...]        (Hydra overrides: key=value, group=option)
       xmodal-train -m KEY=A,B ...        (a sweep: one run per combination)

Train a model (captioner, GAN, VAE, or a plug-in task) on built-in data or your shards. Every
run writes outputs/<experiment>/<run id>/: config.yaml, train.log, metrics.jsonl, checkpoints/
(best.ckpt, last.ckpt), samples/ and plots/; re-running with the same run.id resumes it.

examples:
  xmodal-train                                          # image → text on built-in shapes, no download
  xmodal-train experiment=shapes_text2image_gan         # any experiment below
  xmodal-train data.shards=data/photos                  # your shards (xmodal-shards write ...)
  xmodal-train trainer.max_steps=5000 model.lr=1e-3 logger=csv run.id=lr1e-3
  xmodal-train run.id=lr1e-3                            # resume that run from its last.ckpt
  xmodal-train debug=fdr                                # a few steps of train/val/test: smoke test
  xmodal-train -m model.lr=1e-3,3e-4 seed=0,1           # sweep (locally, or SLURM: hydra/launcher=submitit_slurm)
  xmodal-train --cfg job                                # print the composed config and exit

common overrides:
  trainer.max_steps=N  trainer.val_check_interval=N  trainer.devices=N  trainer=ddp|fsdp2|ddp_cpu
  data.batch_size=N  data.num_workers=N  data.shards=DIR  model.lr=X  seed=N
  logger=wandb|csv|none  run.id=NAME  experiment_name=NAME  callbacks.monitor=val/...
"""

EVAL = """\
usage: xmodal-eval ckpt_path=CKPT [OVERRIDE ...]

Evaluate a checkpoint written by xmodal-train on its test split (and the holdout, if any),
printing the test metrics. ckpt_path= is required; the data comes from the same config keys as
training (data.shards=DIR for your own shards).

examples:
  xmodal-eval ckpt_path=outputs/shapes_caption/<run id>/checkpoints/best.ckpt
  xmodal-eval ckpt_path=best.ckpt data.shards=data/photos data.batch_size=64
"""


def config_groups() -> str:
    """``group: option, ...`` for every config group folder (read from disk: no Hydra, no torch)."""
    lines = []
    for group in sorted(p for p in CONF.iterdir() if p.is_dir() and not p.name.startswith("_")):
        options = sorted(f.stem for f in group.glob("*.yaml"))
        if options:
            lines.append(f"  {group.name}: {', '.join(options)}")
    return "config groups (group=option):\n" + "\n".join(lines) + "\n"


def _wants_help(argv: list[str]) -> bool:
    return any(arg in ("-h", "--help") for arg in argv)


def train_main() -> None:
    if _wants_help(sys.argv[1:]):
        print(TRAIN + "\n" + config_groups() + "\nHydra's own help: xmodal-train --hydra-help")
        return
    from xmodal.train import main

    main()


def eval_main() -> None:
    if _wants_help(sys.argv[1:]):
        print(EVAL + "\n" + config_groups())
        return
    from xmodal.evaluate import main

    main()
