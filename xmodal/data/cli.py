"""``xmodal-shards``: create and inspect WebDataset shard directories.

    xmodal-shards synth --out data/shapes --n 8000 --holdout "red circle"
    xmodal-shards inspect data/shapes

User errors (bad arguments, missing or foreign directories, unsafe shards) print one line to stderr
and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import islice
from pathlib import Path

from rich.console import Console
from rich.table import Table

from xmodal.data.shapes import ShapesSpec, synth
from xmodal.data.shards import ShardError, iter_tar_samples, read_sizes, split_shards

PROG = "xmodal-shards"
_EXAMPLES_PER_SPLIT = 3


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one sub-parser per command."""
    defaults = ShapesSpec()
    parser = argparse.ArgumentParser(
        prog=PROG, description="Create and inspect WebDataset shard directories."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = commands.add_parser("synth", help="generate the procedural 'shapes' dataset (cached by spec)")
    s.add_argument("--out", required=True, type=Path, help="output directory (created; reused if same spec)")
    s.add_argument("--n", dest="n_train", type=int, default=defaults.n_train, help="training samples")
    s.add_argument("--n-val", type=int, default=defaults.n_val, help="validation samples")
    s.add_argument("--n-test", type=int, default=defaults.n_test, help="test (and holdout) samples")
    s.add_argument("--seed", type=int, default=defaults.seed, help="dataset seed")
    s.add_argument("--image-size", type=int, default=defaults.image_size, help="image side in pixels")
    s.add_argument(
        "--max-shapes", type=int, default=defaults.max_shapes, help="at most this many shapes per image"
    )
    s.add_argument(
        "--holdout",
        nargs="+",
        default=[],
        metavar="PAIR",
        help='"colour kind" pairs kept out of train/val/test, e.g. --holdout "red circle" "blue square"',
    )
    s.add_argument(
        "--samples-per-shard", type=int, default=defaults.samples_per_shard, help="samples per tar"
    )
    s.add_argument("--quiet", action="store_true", help="no progress bar")

    i = commands.add_parser("inspect", help="summarise a shard directory and show example samples")
    i.add_argument("dir", type=Path, help="a directory holding sizes.json")
    return parser


def cmd_synth(args: argparse.Namespace, console: Console) -> int:
    spec = ShapesSpec(
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        seed=args.seed,
        image_size=args.image_size,
        max_shapes=args.max_shapes,
        holdout=tuple(args.holdout),
        samples_per_shard=args.samples_per_shard,
    )
    start = time.perf_counter()
    out = synth(args.out, spec, progress=not args.quiet)
    sizes = read_sizes(out)["splits"]
    counts = ", ".join(f"{split} {sum(shards.values())}" for split, shards in sizes.items())
    console.print(f"{out}: {counts} samples (spec {spec.fingerprint()}, {time.perf_counter() - start:.1f} s)")
    return 0


def _example_caption(sample: dict[str, bytes | str]) -> str:
    """The sample's first caption: its ``.txt``, else the JSON ``captions``, else '-'."""
    if "txt" in sample:
        return bytes(sample["txt"]).decode("utf-8", errors="replace").strip()
    if "json" in sample:
        try:
            captions = json.loads(sample["json"]).get("captions") or []
        except (ValueError, AttributeError):
            captions = []
        if captions:
            return str(captions[0])
    return "-"


def cmd_inspect(args: argparse.Namespace, console: Console) -> int:
    directory: Path = args.dir
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    sizes = read_sizes(directory)
    modalities = ", ".join(sizes.get("modalities", [])) or "-"

    summary = Table(title=f"{directory}")
    for column in ("split", "shards", "samples", "modalities"):
        summary.add_column(column, justify="right" if column in ("shards", "samples") else "left")
    for split, shards in sizes["splits"].items():
        summary.add_row(split, str(len(shards)), str(sum(shards.values())), modalities)
    console.print(summary)
    if isinstance(sizes.get("spec"), dict):
        spec = ", ".join(f"{k}={v}" for k, v in sizes["spec"].items())
        console.print(f"spec: {spec}")

    examples = Table(title=f"first {_EXAMPLES_PER_SPLIT} samples of each split")
    for column in ("split", "key", "members", "caption"):
        examples.add_column(column, overflow="fold")
    for split in sizes["splits"]:
        shards = split_shards(directory, split)
        if not shards:
            continue
        for sample in islice(iter_tar_samples(shards[0]), _EXAMPLES_PER_SPLIT):
            members = ",".join(sorted(k for k in sample if not k.startswith("__")))
            examples.add_row(split, str(sample["__key__"]), members, _example_caption(sample))
    console.print(examples)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code (0 ok, 2 user error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed usage + error (or --help)
        return int(exit_.code or 0)
    console = Console(width=max(Console().width, 120))  # wide enough that captions rarely wrap in logs
    commands = {"synth": cmd_synth, "inspect": cmd_inspect}
    try:
        return commands[args.command](args, console)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, ShardError) as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
