"""A Chinese-caption captioner: character-level BLEU-4 and key-word accuracy of a full run.

    python benchmarks/chinese_caption.py [--steps 1000] [--data-dir data] [extra overrides...]

Trains ``experiment=shapes_caption_zh`` (the shapes scenes captioned in Chinese, word tokenizer:
one Han character per token) in a temporary run dir, then reads its best checkpoint back and
captions the test split: prints val/test BLEU-4 and CIDEr-D (scored on characters, as sacrebleu's
``zh`` tokenizer does) and the key-word accuracy of colours, kinds and colour–kind pairs
(``xmodal.data.shapes.zh_keyword_accuracy``; chance for one shape 1/6, 1/4, 1/24), with a few
captions for the eye.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from xmodal.config import compose_config
from xmodal.data.batch import to_model_units
from xmodal.data.datamodule import iter_split
from xmodal.data.epoch_plan import Topology
from xmodal.data.shapes import zh_keyword_accuracy
from xmodal.factory import build_datamodule, prepare_data
from xmodal.tasks.caption.task import CaptionTask
from xmodal.train import train


def caption_test_split(cfg: object, ckpt: Path) -> tuple[list[str], list[list[tuple[str, str]]], list[str]]:
    """Greedy captions of every test sample from ``ckpt``, the scenes' (colour, kind) lists and
    the reference captions, in the loader's order."""
    task = CaptionTask.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False).eval()
    datamodule = build_datamodule(cfg, prepare_data(cfg), tokenizer=task.tokenizer)
    scenes = {
        s["__key__"]: [(x["colour"], x["kind"]) for x in json.loads(s["json"])["shapes"]]
        for s in iter_split(datamodule.shards_dir, "test")
    }
    hyps, truth, refs = [], [], []
    for batch in datamodule.loader("test", Topology(0, 1, 0)):
        batch = to_model_units(batch)
        valid = batch["valid"].tolist()
        with torch.no_grad():
            captions = task.caption(batch["image"])
        for key, caption, ref, keep in zip(batch["__key__"], captions, batch["captions"], valid, strict=True):
            if keep:
                hyps.append(caption)
                truth.append(scenes[key])
                refs.append(ref[0])
    return hyps, truth, refs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--data-dir", default="data", help="built-in data cache (paths.data_dir)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(
            [
                "experiment=shapes_caption_zh",
                f"trainer.max_steps={args.steps}",
                "trainer.enable_progress_bar=false",
                "logger=csv",
                f"paths.data_dir={Path(args.data_dir).resolve()}",
                f"paths.output_dir={tmp}",
                *args.overrides,
            ]
        )
        start = time.perf_counter()
        metrics = train(cfg)
        wall = time.perf_counter() - start
        run_dir = next(Path(tmp).glob("*/*/metrics.json")).parent
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((run_dir / "metrics.json").read_text())
        hyps, truth, refs = caption_test_split(cfg, Path(summary["best_checkpoint"]))
    accuracy = zh_keyword_accuracy(hyps, truth)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.steps} steps"
    )
    print(f"wall time (train + test): {wall:.1f} s")
    steps = " / ".join(f"{h['step']}: {h['val/bleu4']:.3f}" for h in history)
    print(f"val BLEU-4 (characters) by step: {steps}")
    print(f"test BLEU-4 (characters, best checkpoint): {metrics['test/bleu4']:.3f}")
    print(f"test CIDEr-D (characters): {metrics['test/cider']:.3f}")
    print(
        f"test key-word accuracy over {len(hyps)} captions: colours {accuracy['colour']:.3f}, "
        f"kinds {accuracy['kind']:.3f}, colour–kind pairs {accuracy['pair']:.3f}"
    )
    for hyp, ref in list(zip(hyps, refs, strict=True))[:5]:
        print(f"  generated {hyp}   reference {ref}")


if __name__ == "__main__":
    main()
